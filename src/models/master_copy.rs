//! A second copy of a model's weights (another dtype or memory layout) that follows
//! the trainable float32 master weights through their version counters: any
//! in-place update of a master tensor (an optimiser step, a checkpoint restore)
//! marks the copy stale, and [`MasterCopy::sync`] refreshes it in place, so that a
//! captured CUDA graph keeps pointing at the right memory.

use tch::Tensor;

pub struct MasterCopy {
    /// (name, master, copy), sorted by name.
    pairs: Vec<(String, Tensor, Tensor)>,
    /// Version counters of the masters at the last refresh.
    versions: Vec<i64>,
    refreshes: usize,
}

impl MasterCopy {
    /// Pair each master tensor with its copy (same shapes) and fill the copies.
    pub fn new(mut pairs: Vec<(String, Tensor, Tensor)>) -> MasterCopy {
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        let mut c = MasterCopy {
            pairs,
            versions: Vec::new(),
            refreshes: 0,
        };
        c.refresh();
        c
    }

    /// The copy of master variable `name`.
    pub fn copy_of(&self, name: &str) -> Option<&Tensor> {
        self.pairs
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, _, c)| c)
    }

    /// How many times the copy was refreshed from the master weights.
    pub fn refreshes(&self) -> usize {
        self.refreshes
    }

    fn master_versions(&self) -> Vec<i64> {
        self.pairs
            .iter()
            .map(|(_, m, _)| m.internal_version())
            .collect()
    }

    /// Copy the master weights into the copy (in place, converting the dtype).
    pub fn refresh(&mut self) {
        tch::no_grad(|| {
            for (_, m, c) in &mut self.pairs {
                c.copy_(m);
            }
        });
        self.versions = self.master_versions();
        self.refreshes += 1;
    }

    /// Whether the master weights changed since the last refresh.
    pub fn is_stale(&self) -> bool {
        self.master_versions() != self.versions
    }

    /// Refresh if the master weights changed; returns whether it refreshed.
    pub fn sync(&mut self) -> bool {
        let stale = self.is_stale();
        if stale {
            self.refresh();
        }
        stale
    }
}
