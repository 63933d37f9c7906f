//! Paired (base, chat) activations: the on-disk cache (format, writer), its shuffled reader, and the
//! on-the-fly source that computes the same pairs without a disk cache.

pub mod batches;
pub mod cache;
pub mod onthefly;
pub(crate) mod plan;
pub mod reader;
pub mod writer;
