//! Fuzzing on stable Rust of every decoder that reads untrusted bytes: the wire protocol, GGUF
//! files, topology files, the OpenAI API's bodies and SEV-SNP evidence.
//!
//! No fuzzing framework: a seeded mutation engine ([`mutate`]), a corpus of real inputs per
//! target built in code ([`targets`]), and a loop ([`runner`]) that runs each input under
//! `catch_unwind` and measures the heap it takes. An input that reaches a new outcome (another
//! error, or a success) joins the corpus: the only feedback, and enough to get past the first
//! checks of each format. `talaria-fuzz` (the binary) runs it; see docs/reliability.md.

mod abort;
pub mod memory;
pub mod mutate;
pub mod runner;
pub mod targets;

pub use runner::{Options, Report, fuzz};
pub use targets::{TARGETS, Target, target};

/// Every allocation of a process that links this crate is counted, per thread.
#[global_allocator]
static ALLOC: memory::Counting = memory::Counting;

/// Runs `target` as [`fuzz`] does.
pub fn fuzz_target(target: &Target, opts: &Options) -> Report {
    fuzz(
        target.name,
        &target.run,
        (target.seeds)(),
        target.text,
        target.dict,
        opts,
    )
}
