//! ReMO — Reversible Masked Outsourcing — the CVM's side: pure computation, no I/O.
//!
//! For a linear op `Y = X·W`, the CVM sends `X̃ = X + C·M_pub`, where the public basis `M_pub`
//! is known to the cloud (sent as a seed) and the coefficients `C` are fresh, private and scaled
//! by a constant public scale σ·ρ_op; the cloud returns `X̃·W`; the CVM subtracts `C·R_pub` with
//! `R_pub = M_pub·W`, obtained once at set-up. At full rank (the default) the basis is the
//! identity: masks are fresh Gaussian noise and `R_pub` is `W` itself, provisioned only to an
//! attested CVM. Dummy rows (pure masks, whose products the CVM knows) and a shuffle hide the row
//! count and order and catch a cloud that returns wrong results. Because masks do not depend on
//! the data, they and their products are precomputed in a pool on a background thread.

mod error;
pub mod fixed;
pub mod grid;
mod masker;
mod pool;
pub mod verify;

pub use error::RemoError;
pub use fixed::{FixedPointLinear, IntProduct};
pub use masker::{Masker, MaskerStats, Pending, PublicOp};
pub use pool::SharedPools;
