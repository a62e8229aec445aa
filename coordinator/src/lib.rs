//! `farm-coordinator`.
