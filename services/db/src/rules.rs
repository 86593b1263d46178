//! TEMPORARY stub: shared storage rules replace this file.
