//! The `spotlight` command's file handling as a library: reading problems from safetensors files
//! with every check (used by the binary, and by the fuzz/mutation tests in-process).

pub mod files;
pub mod run;
