//! Training logs: JSON lines and TensorBoard event files.
//!
//! The event-file writer is small and self-contained: each record is
//! `len (u64 LE) | masked crc32c(len) | data | masked crc32c(data)`, where data is a
//! serialised `tensorflow.Event` protobuf with `wall_time` (field 1, double),
//! `step` (field 2, int64) and either `file_version` (field 3, string) or a
//! `summary` (field 5) holding scalar values (`tag` field 1, `simple_value` field 2).

use anyhow::{Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c::crc32c(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn key(field: u32, wire: u32, out: &mut Vec<u8>) {
    varint(((field << 3) | wire) as u64, out);
}

fn bytes_field(field: u32, data: &[u8], out: &mut Vec<u8>) {
    key(field, 2, out);
    varint(data.len() as u64, out);
    out.extend_from_slice(data);
}

fn event(wall_time: f64, step: i64, body: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut e = Vec::new();
    key(1, 1, &mut e);
    e.extend_from_slice(&wall_time.to_le_bytes());
    key(2, 0, &mut e);
    varint(step as u64, &mut e);
    body(&mut e);
    e
}

/// Scalar summaries in a TensorBoard-readable `events.out.tfevents.*` file.
pub struct EventWriter {
    file: std::fs::File,
    pub path: PathBuf,
}

impl EventWriter {
    pub fn create(dir: &Path) -> Result<EventWriter> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs_f64();
        let path = dir.join(format!("events.out.tfevents.{}.adt", now as u64));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        let mut w = EventWriter { file, path };
        let ev = event(now, 0, |e| bytes_field(3, b"brain.Event:2", e));
        w.write_record(&ev)?;
        Ok(w)
    }

    fn write_record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut rec = Vec::with_capacity(data.len() + 16);
        rec.extend_from_slice(&len);
        rec.extend_from_slice(&masked_crc(&len).to_le_bytes());
        rec.extend_from_slice(data);
        rec.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.file
            .write_all(&rec)
            .with_context(|| format!("writing {}", self.path.display()))?;
        Ok(())
    }

    /// Write scalars for one step.
    pub fn scalars(&mut self, step: i64, values: &[(&str, f64)]) -> Result<()> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs_f64();
        let mut summary = Vec::new();
        for (tag, v) in values {
            let mut val = Vec::new();
            bytes_field(1, tag.as_bytes(), &mut val);
            key(2, 5, &mut val);
            val.extend_from_slice(&(*v as f32).to_le_bytes());
            bytes_field(1, &val, &mut summary);
        }
        let ev = event(now, step, |e| bytes_field(5, &summary, e));
        self.write_record(&ev)?;
        self.file
            .flush()
            .with_context(|| format!("writing {}", self.path.display()))?;
        Ok(())
    }
}

/// Append-only JSON-lines metrics file.
pub struct JsonlWriter {
    file: std::fs::File,
    path: PathBuf,
}

impl JsonlWriter {
    pub fn open(path: &Path) -> Result<JsonlWriter> {
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(JsonlWriter {
            file,
            path: path.to_path_buf(),
        })
    }

    pub fn write(&mut self, v: &serde_json::Value) -> Result<()> {
        writeln!(self.file, "{}", serde_json::to_string(v)?)
            .and_then(|_| self.file.flush())
            .with_context(|| format!("writing {}", self.path.display()))?;
        Ok(())
    }
}

/// Keep the lines of a metrics log whose `step` is below `step`, in order; lines
/// that do not parse (a line torn by a kill) are dropped too. Written atomically.
pub fn truncate_jsonl(path: &Path, step: usize) -> Result<()> {
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut kept = Vec::with_capacity(text.len());
    for line in text.split(|&b| b == b'\n') {
        let keep = serde_json::from_slice::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
            .is_some_and(|s| (s as usize) < step);
        if keep {
            kept.extend_from_slice(line);
            kept.push(b'\n');
        }
    }
    if kept.len() != text.len() {
        crate::weights::atomic_write(path, &kept)?;
    }
    Ok(())
}

/// Read back an event file written by [`EventWriter`]: (step, tag, value) triples.
/// Checks both CRCs of every record.
pub fn read_scalars(path: &Path) -> Result<Vec<(i64, String, f32)>> {
    let data = std::fs::read(path)?;
    let mut out = Vec::new();
    let mut i = 0;
    let rd_varint = |b: &[u8], i: &mut usize| -> u64 {
        let (mut v, mut s) = (0u64, 0);
        loop {
            let x = b[*i];
            *i += 1;
            v |= ((x & 0x7f) as u64) << s;
            if x < 0x80 {
                return v;
            }
            s += 7;
        }
    };
    while i < data.len() {
        anyhow::ensure!(
            i + 12 <= data.len(),
            "{}: truncated record header",
            path.display()
        );
        let len_bytes = &data[i..i + 8];
        let len = u64::from_le_bytes(len_bytes.try_into()?) as usize;
        let crc = u32::from_le_bytes(data[i + 8..i + 12].try_into()?);
        anyhow::ensure!(
            crc == masked_crc(len_bytes),
            "{}: bad length crc",
            path.display()
        );
        let body = &data[i + 12..i + 12 + len];
        let crc = u32::from_le_bytes(data[i + 12 + len..i + 16 + len].try_into()?);
        anyhow::ensure!(crc == masked_crc(body), "{}: bad data crc", path.display());
        i += 16 + len;
        // Parse Event.
        let (mut j, mut step) = (0, 0i64);
        while j < body.len() {
            let k = rd_varint(body, &mut j);
            let (field, wire) = (k >> 3, k & 7);
            match wire {
                0 => {
                    let v = rd_varint(body, &mut j);
                    if field == 2 {
                        step = v as i64;
                    }
                }
                1 => j += 8,
                5 => j += 4,
                2 => {
                    let n = rd_varint(body, &mut j) as usize;
                    let sub = &body[j..j + n];
                    j += n;
                    if field == 5 {
                        let mut a = 0;
                        while a < sub.len() {
                            let _k = rd_varint(sub, &mut a);
                            let n = rd_varint(sub, &mut a) as usize;
                            let val = &sub[a..a + n];
                            a += n;
                            let (mut b, mut tag, mut value) = (0, String::new(), 0f32);
                            while b < val.len() {
                                let k = rd_varint(val, &mut b);
                                if k >> 3 == 1 {
                                    let n = rd_varint(val, &mut b) as usize;
                                    tag = String::from_utf8_lossy(&val[b..b + n]).into();
                                    b += n;
                                } else {
                                    value = f32::from_le_bytes(val[b..b + 4].try_into()?);
                                    b += 4;
                                }
                            }
                            out.push((step, tag, value));
                        }
                    }
                }
                _ => anyhow::bail!("{}: unexpected wire type {wire}", path.display()),
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_matches_tensorflow_reference() {
        // TensorFlow's masked CRC of the empty string and of "a".
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(
            masked_crc(b""),
            0u32.rotate_right(15).wrapping_add(0xa282_ead8)
        );
    }

    #[test]
    fn event_file_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        w.scalars(3, &[("loss_d", 1.5), ("loss_g_adv", -0.25)])
            .unwrap();
        w.scalars(4, &[("loss_d", 1.25)]).unwrap();
        let s = read_scalars(&w.path).unwrap();
        assert_eq!(
            s,
            vec![
                (3, "loss_d".into(), 1.5),
                (3, "loss_g_adv".into(), -0.25),
                (4, "loss_d".into(), 1.25)
            ]
        );
    }
}
