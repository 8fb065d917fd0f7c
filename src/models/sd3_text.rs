//! SD3 text stack (in progress).
