//! Test support shared by pxelab crates (see the crate description).
