//! TEMPORARY stub: the gRPC server replaces this file.
