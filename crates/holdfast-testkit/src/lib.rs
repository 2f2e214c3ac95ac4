//! What Holdfast's tests share, so that no test file re-implements it (a dev-dependency only):
//!
//! - [`db`]: a fresh database per test on SQLite and on Postgres, and [`both_backends!`] to
//!   run one test body on each;
//! - [`app`]: the shop in-process on a fresh store (zero2prod's `spawn_app`), called through
//!   its real router, or served on port 0;
//! - [`pgwire`]: the round trips a process makes to PostgreSQL, counted on the wire;
//! - [`process`]: the real `holdfast` binary as a child process, judged from the outside;
//! - [`redis`]: the `REDIS_URL` server, a key prefix per test, and "Redis lost its memory";
//! - [`s3`]: a real S3-compatible server (moto's) per test;
//! - [`system`]: a whole system (`holdfast up`, started exactly as the drill starts it) and a
//!   shopper that talks to it;
//! - [`uploads`]: `holdfast-uploads` in-process without the shop, instances sharing a blob
//!   directory.

pub mod app;
pub mod db;
pub mod pgwire;
pub mod process;
pub mod redis;
pub mod s3;
pub mod system;
pub mod uploads;

pub use holdfast_core::Backend;
