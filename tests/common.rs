//! Shared helpers: the engine (with the CI rule), random problems, and the judgement against the
//! f64 reference.

use std::sync::OnceLock;

use spotlight::reference::{self, Reference, compare};
use spotlight::{Algorithm, DType, Engine, Inputs, Output, Problem, RunOptions};

/// How many engines the tests share (`SPOTLIGHT_TEST_ENGINES`, default 2). Each engine is its
/// own device, and a software adapter compiles a kernel the first time it runs it, on that
/// device's queue: with one engine for all tests, every first compile waits for the others; with
/// one per test thread they run side by side.
fn engine_count() -> usize {
    std::env::var("SPOTLIGHT_TEST_ENGINES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2)
        .clamp(1, 8)
}

struct Shared {
    engine: Option<Engine>,
    /// Tests (threads) using it now.
    users: std::sync::atomic::AtomicUsize,
}

/// Gives a thread's engine back when the thread (the test) ends.
struct Slot(Option<usize>);

impl Drop for Slot {
    fn drop(&mut self) {
        if let (Some(i), Some(all)) = (self.0, ENGINES.get()) {
            all[i]
                .users
                .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

static ENGINES: OnceLock<Vec<Shared>> = OnceLock::new();

thread_local! {
    static SLOT: std::cell::RefCell<Slot> = const { std::cell::RefCell::new(Slot(None)) };
}

/// The engine of this test: one of `engine_count()` shared engines, the least used one when the
/// test first asks (and the same one for the rest of it). With `CI=true` and no adapter the test
/// fails; elsewhere it says loudly that it skips.
pub fn engine() -> Option<&'static Engine> {
    let all = ENGINES.get_or_init(|| {
        (0..engine_count())
            .map(|_| Shared {
                engine: new_engine(),
                users: 0.into(),
            })
            .collect()
    });
    let i = SLOT.with(|slot| {
        let mut slot = slot.borrow_mut();
        *slot.0.get_or_insert_with(|| {
            use std::sync::atomic::Ordering::SeqCst;
            let i = (0..all.len())
                .min_by_key(|&i| all[i].users.load(SeqCst))
                .unwrap_or(0);
            all[i].users.fetch_add(1, SeqCst);
            i
        })
    });
    all[i].engine.as_ref()
}

fn new_engine() -> Option<Engine> {
    match Engine::new() {
        Ok(e) => {
            eprintln!("spotlight-tests: adapter {}", e.describe());
            // A run asked for one backend (scripts/test: vulkan, then gl) really runs on it.
            if let Ok(want) = std::env::var("WGPU_BACKEND") {
                let got = e.adapter_info().backend;
                assert!(
                    wgpu::Backends::from_comma_list(&want).contains(got.into()),
                    "WGPU_BACKEND={want} but the engine runs on {got:?}"
                );
            }
            Some(e)
        }
        Err(err) => {
            spotlight::testing::require("the GPU tests", Some(format!("no GPU adapter ({err})")))
                .and(None)
        }
    }
}

/// A second engine on the same adapter that uses no optional feature (f16 read as packed words,
/// no subgroup operations), so the path of adapters without them is tested too.
pub fn packed_engine() -> Option<&'static Engine> {
    static ENGINE: OnceLock<Option<Engine>> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            engine().map(|_| {
                Engine::new()
                    .expect("adapter")
                    .with_packed_f16()
                    .without_subgroups()
            })
        })
        .as_ref()
}

/// A problem's data (the reference crate's owned inputs; `Data::random` makes fresh ones).
pub use spotlight::reference::OwnedInputs as Data;

/// Error budgets (relative Frobenius) against the f64 reference on the same (rounded) inputs.
pub struct Budget {
    pub out: f64,
    pub lse: f64,
    pub probs: f64,
}

impl Budget {
    /// The foundation's budget for f32 problems: O 1e-5, LSE 1e-6.
    pub fn strict() -> Self {
        Budget {
            out: 1e-5,
            lse: 1e-6,
            probs: 1e-5,
        }
    }

    /// The semantics suite's budget: 1e-5 relative for O, P and LSE in f32 (the LSE of a short
    /// row is about the size of one logit, so its relative error is that of f32 arithmetic, not
    /// 1e-6). Half-precision inputs are judged against the reference on the same rounded inputs,
    /// so the budget is that of f32 arithmetic unless the output itself is rounded.
    pub fn for_output(out: DType) -> Self {
        match out {
            DType::F32 => Budget {
                out: 1e-5,
                lse: 1e-5,
                probs: 1e-5,
            },
            DType::F16 => Budget {
                out: 1e-3,
                lse: 1e-5,
                probs: 1e-5,
            },
            DType::Bf16 => Budget {
                out: 8e-3,
                lse: 1e-5,
                probs: 1e-5,
            },
        }
    }
}

/// Runs `p` on the GPU with `algorithm` (LSE always, probs when asked), and checks O, LSE and P
/// against the reference. Returns a description of the failure.
pub fn check(
    engine: &Engine,
    p: &Problem,
    data: &Data,
    algorithm: Algorithm,
    probs: bool,
    out_dtype: Option<DType>,
    budget: Option<Budget>,
) -> Result<(), String> {
    let opts = RunOptions {
        algorithm,
        probs,
        out_dtype,
        ..Default::default()
    };
    check_opts(engine, p, data, &opts, budget)
}

/// [`check`] with every run option (the LSE is always returned and checked).
pub fn check_opts(
    engine: &Engine,
    p: &Problem,
    data: &Data,
    opts: &RunOptions,
    budget: Option<Budget>,
) -> Result<(), String> {
    let inputs = data.inputs();
    let want: Reference =
        reference::attention(p, &inputs).map_err(|e| format!("reference: {e}"))?;
    let opts = RunOptions { lse: true, ..*opts };
    let (algorithm, probs) = (opts.algorithm, opts.probs);
    let got: Output = engine
        .attention(p, &inputs, &opts)
        .map_err(|e| format!("gpu: {e}"))?;
    let out_dtype = opts.out_dtype.unwrap_or(data.q.dtype());
    if got.out.dtype() != out_dtype {
        return Err(format!(
            "out dtype {:?}, expected {out_dtype:?}",
            got.out.dtype()
        ));
    }
    let budget = budget.unwrap_or_else(|| Budget::for_output(out_dtype));
    let e_out = compare::compare(&got.out.to_f32_vec(), &want.out);
    let e_lse = compare::compare(got.lse.as_deref().unwrap_or(&[]), &want.lse);
    let mut msg = String::new();
    if !e_out.within(budget.out) {
        msg += &format!("O: {e_out} (budget {:.0e}); ", budget.out);
    }
    if !e_lse.within(budget.lse) {
        msg += &format!("LSE: {e_lse} (budget {:.0e}); ", budget.lse);
    }
    if probs {
        let e_p = compare::compare(got.probs.as_deref().unwrap_or(&[]), &want.probs);
        if !e_p.within(budget.probs) {
            msg += &format!("P: {e_p} (budget {:.0e}); ", budget.probs);
        }
    }
    if msg.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "[{} ran {}] {msg}",
            algorithm.name(),
            got.algorithm.name()
        ))
    }
}

/// The GPU algorithms every differential test runs.
pub const ALGORITHMS: [Algorithm; 3] = [Algorithm::ThreePass, Algorithm::Flash, Algorithm::SplitK];

/// One `#[test]` per algorithm of [`ALGORITHMS`] for a body `fn(Algorithm)`, in a module named
/// after the body: a failure names its cell (`differential::random_problems::flash`), and the
/// cells run side by side on the test threads (and their engines). `covers_every_algorithm`
/// fails when `ALGORITHMS` gains a member the cells do not have.
macro_rules! per_algorithm {
    ($module:ident, $body:path) => {
        mod $module {
            use spotlight::Algorithm;

            #[test]
            fn three_pass() {
                $body(Algorithm::ThreePass)
            }

            #[test]
            fn flash() {
                $body(Algorithm::Flash)
            }

            #[test]
            fn split_k() {
                $body(Algorithm::SplitK)
            }

            #[test]
            fn covers_every_algorithm() {
                let cells = [Algorithm::ThreePass, Algorithm::Flash, Algorithm::SplitK];
                assert_eq!(crate::common::ALGORITHMS, cells);
            }
        }
    };
}

/// Fails the test when any case failed, listing every failure (and out of how many cases ran,
/// where the test counts them).
#[track_caller]
pub fn assert_all_passed(failures: &[String], of: Option<usize>) {
    let total = of.map_or(String::new(), |n| format!(" of {n}"));
    assert!(
        failures.is_empty(),
        "{}{total} failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The kernels one call of `p` with `opts` ran, in order, one name per kernel (from
/// `Engine::time_passes` on resident buffers), or `None` where the adapter has no timestamp
/// queries (the caller says what it then did not check).
pub fn kernels_run(
    engine: &Engine,
    p: &Problem,
    inputs: &Inputs<'_>,
    opts: &RunOptions,
) -> Option<Vec<&'static str>> {
    let resident = engine.upload(p, inputs, opts).unwrap();
    let (gi, go) = (resident.inputs(), resident.outputs());
    let profile = engine
        .time_passes(|enc| {
            engine
                .attention_on_buffers(enc, p, &gi, &go, opts)
                .map(drop)
        })
        .unwrap();
    engine
        .capabilities()
        .timestamp_query
        .then(|| profile.kernels.iter().map(|k| k.kernel).collect())
}
