//! placeholder while bootstrapping
