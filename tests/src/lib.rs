//! Cross-crate integration and simulation tests of tidemark; the tests live
//! in `tests/`.
