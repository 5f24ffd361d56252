//! Test support for placement's own tests. etcd, child processes, ports and
//! polling come from `skv-testkit`; this adds only a fake storenode (an extra
//! tier: the real end-to-end runs in testkit).
#![allow(dead_code)]

pub mod fake_store;
