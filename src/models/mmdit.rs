//! SD3 MMDiT transformer (in progress).
