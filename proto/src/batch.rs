//! Batch file formats (placeholder).
