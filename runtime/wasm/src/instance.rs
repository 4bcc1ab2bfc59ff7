//! One sandboxed instance of a plugin: batches in, records and dead letters out.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use wasmtime::{Memory, Store, Trap, TypedFunc};
use weir_plugin_sdk::abi::{self, EncodeRecord, Entry, Outcome, RecordView};

use crate::plugin::{PluginInner, StoreState};
use crate::{Error, Record};

/// A record the plugin produced, and the index of the input record it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Produced<T = Record> {
    pub input_index: usize,
    pub record: T,
}

/// An input record the plugin could not handle, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    pub input_index: usize,
    pub fault: Fault,
}

/// The result of one batch: produced records in input order, and the dead letters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Output<T = Record> {
    pub records: Vec<Produced<T>>,
    pub dead_letters: Vec<DeadLetter>,
}

impl<T> Default for Output<T> {
    fn default() -> Self {
        Output {
            records: Vec::new(),
            dead_letters: Vec::new(),
        }
    }
}

/// What went wrong with a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FaultKind {
    /// The plugin returned an error for the record.
    PluginError,
    /// The plugin panicked.
    Panic,
    /// The call used up its CPU budget (an endless loop, or too little budget).
    CpuBudget,
    /// The module tried to grow its memory past the instance's cap.
    MemoryLimit,
    /// The module overflowed its call stack.
    StackOverflow,
    /// Another WebAssembly trap (out-of-bounds access, division by zero, `unreachable`, ...).
    Trap,
    /// The module broke the ABI: malformed output, a bad buffer, a whole-call failure.
    BadOutput,
}

impl FaultKind {
    pub const ALL: [FaultKind; 7] = [
        FaultKind::PluginError,
        FaultKind::Panic,
        FaultKind::CpuBudget,
        FaultKind::MemoryLimit,
        FaultKind::StackOverflow,
        FaultKind::Trap,
        FaultKind::BadOutput,
    ];

    /// A stable name, for dead-letter headers and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::PluginError => "plugin-error",
            FaultKind::Panic => "panic",
            FaultKind::CpuBudget => "cpu-budget",
            FaultKind::MemoryLimit => "memory-limit",
            FaultKind::StackOverflow => "stack-overflow",
            FaultKind::Trap => "trap",
            FaultKind::BadOutput => "bad-output",
        }
    }

    /// Whether the instance had to be replaced (everything but a returned error).
    pub fn is_crash(self) -> bool {
        self != FaultKind::PluginError
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a record became a dead letter: a kind and a message for people.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fault {
    pub kind: FaultKind,
    pub message: String,
}

impl Fault {
    fn new(kind: FaultKind, message: impl Into<String>) -> Fault {
        Fault {
            kind,
            message: message.into(),
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

/// Name the cause of a failed call into the module.
pub(crate) fn classify(state: &StoreState, err: &wasmtime::Error, budget: u64) -> Fault {
    if let Some(msg) = &state.panic_message {
        return Fault::new(FaultKind::Panic, format!("the plugin panicked: {msg}"));
    }
    let memory = state.limiter.denied.map(|desired| {
        format!(
            "the plugin ran out of memory: it tried to grow its memory to {desired} bytes, over \
             its limit of {} bytes",
            state.limiter.max_bytes
        )
    });
    match err.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => Fault::new(
            FaultKind::CpuBudget,
            format!(
                "the plugin used up its CPU budget of {budget} fuel units for this call (an endless \
                 loop, or raise the limit)"
            ),
        ),
        Some(Trap::StackOverflow) => Fault::new(
            FaultKind::StackOverflow,
            "the plugin overflowed its call stack (endless or too deep recursion)",
        ),
        Some(trap) => match memory {
            Some(m) => Fault::new(FaultKind::MemoryLimit, format!("{m} (then trapped: {trap})")),
            None if *trap == Trap::MemoryOutOfBounds => Fault::new(
                FaultKind::Trap,
                format!(
                    "the plugin trapped: {trap} (in a Rust plugin, often its stack overflowing: \
                     deep recursion or large local variables)"
                ),
            ),
            None => Fault::new(FaultKind::Trap, format!("the plugin trapped: {trap}")),
        },
        None => match memory {
            Some(m) => Fault::new(FaultKind::MemoryLimit, m),
            None => Fault::new(
                FaultKind::Trap,
                format!("the plugin failed: {}", err.root_cause()),
            ),
        },
    }
}

struct Live {
    store: Store<StoreState>,
    memory: Memory,
    alloc: TypedFunc<u32, u32>,
    process: TypedFunc<(u32, u32), u64>,
}

/// One sandboxed instance of a plugin, reused from batch to batch. Not shared between threads
/// at once: give each pipeline task its own ([`crate::Plugin::instance`]).
pub struct Instance {
    inner: Arc<PluginInner>,
    live: Live,
    input: Vec<u8>,
    restarts: u64,
    fuel_used: u64,
}

impl Instance {
    pub(crate) fn start(inner: Arc<PluginInner>) -> Result<Instance, Error> {
        let live = Live::start(&inner)?;
        Ok(Instance {
            inner,
            live,
            input: Vec::new(),
            restarts: 0,
            fuel_used: 0,
        })
    }

    /// The plugin's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// How many times a faulted module was replaced by a fresh instance.
    pub fn restarts(&self) -> u64 {
        self.restarts
    }

    /// The fuel this instance's calls consumed, all told (faulted calls included).
    pub fn fuel_used(&self) -> u64 {
        self.fuel_used
    }

    /// Run the plugin over a batch: one call into the module for the whole batch. If that call
    /// faults, the instance is replaced and the batch retried one record at a time, so that only
    /// the records that fault alone become dead letters.
    ///
    /// `Err` means the plugin cannot run at all any more: a fresh instance failed to start (its
    /// init fails now). The caller stops the pipeline with that error.
    ///
    /// The records produced come as `T`, made by `build` from a view into the call's output and
    /// that output itself (one copy of the module's output per call, which `build` may slice
    /// instead of copying each field). [`Instance::process_records`] makes SDK records.
    pub fn process<R: EncodeRecord, T>(
        &mut self,
        batch: &[R],
        mut build: impl FnMut(&Bytes, RecordView<'_>) -> T,
    ) -> Result<Output<T>, Error> {
        let mut out = Output::default();
        if batch.is_empty() {
            return Ok(out);
        }
        let fault = match self.call(batch, &mut build) {
            Ok(entries) => {
                absorb(&mut out, entries, 0);
                return Ok(out);
            }
            Err(fault) => fault,
        };
        self.restart(&fault)?;
        if batch.len() == 1 {
            out.dead_letters.push(DeadLetter {
                input_index: 0,
                fault,
            });
            return Ok(out);
        }
        tracing::debug!(
            target: "weir::plugin",
            plugin = &*self.inner.name,
            "a batch of {} records faulted ({fault}); retrying record by record",
            batch.len()
        );
        for (i, record) in batch.iter().enumerate() {
            match self.call(std::slice::from_ref(record), &mut build) {
                Ok(entries) => absorb(&mut out, entries, i),
                Err(fault) => {
                    self.restart(&fault)?;
                    out.dead_letters.push(DeadLetter {
                        input_index: i,
                        fault,
                    });
                }
            }
        }
        Ok(out)
    }

    /// [`Instance::process`] with owned SDK records in and out.
    pub fn process_records(&mut self, batch: &[Record]) -> Result<Output, Error> {
        self.process(batch, |_, v| v.to_record())
    }

    fn restart(&mut self, why: &Fault) -> Result<(), Error> {
        tracing::warn!(
            target: "weir::plugin",
            plugin = &*self.inner.name,
            pipeline = self.inner.pipeline.as_deref().unwrap_or("-"),
            "replacing the plugin instance after a fault: {why}"
        );
        self.live = Live::start(&self.inner)?;
        self.restarts += 1;
        Ok(())
    }

    /// One call into the module with `records`.
    fn call<R: EncodeRecord, T>(
        &mut self,
        records: &[R],
        build: &mut impl FnMut(&Bytes, RecordView<'_>) -> T,
    ) -> Result<Vec<Entry<T>>, Fault> {
        let limits = &self.inner.limits;
        let budget = limits
            .fuel_per_call
            .saturating_add(limits.fuel_per_record.saturating_mul(records.len() as u64));
        self.input.clear();
        abi::encode_batch(records, &mut self.input);
        let live = &mut self.live;
        let len = u32::try_from(self.input.len()).map_err(|_| {
            Fault::new(
                FaultKind::BadOutput,
                format!(
                    "the batch encodes to {} bytes, over 4 GiB",
                    self.input.len()
                ),
            )
        })?;
        live.store
            .set_fuel(budget)
            .map_err(|e| Fault::new(FaultKind::Trap, format!("{e:#}")))?;
        live.store.data_mut().begin_call();
        let result = call_module(live, &self.input, len, budget, records.len(), build);
        live.store.data_mut().end_call();
        let left = live.store.get_fuel().unwrap_or(0);
        self.fuel_used += budget.saturating_sub(left);
        result
    }
}

fn call_module<T>(
    live: &mut Live,
    input: &[u8],
    len: u32,
    budget: u64,
    count: usize,
    build: &mut impl FnMut(&Bytes, RecordView<'_>) -> T,
) -> Result<Vec<Entry<T>>, Fault> {
    let ptr = live
        .alloc
        .call(&mut live.store, len)
        .map_err(|e| classify(live.store.data(), &e, budget))?;
    let dest = region(live.memory.data_mut(&mut live.store), ptr, len).ok_or_else(|| {
        Fault::new(
            FaultKind::BadOutput,
            format!("weir_alloc({len}) returned {ptr}, outside the module's memory"),
        )
    })?;
    dest.copy_from_slice(input);
    let packed = live
        .process
        .call(&mut live.store, (ptr, len))
        .map_err(|e| classify(live.store.data(), &e, budget))?;
    let (optr, olen) = abi::unpack_ptr_len(packed);
    let data = live.memory.data(&live.store);
    let bytes = data
        .get(optr as usize..(optr as usize).saturating_add(olen as usize))
        .ok_or_else(|| {
            Fault::new(
                FaultKind::BadOutput,
                format!(
                    "weir_process returned output at {optr}+{olen}, outside the module's memory ({} bytes)",
                    data.len()
                ),
            )
        })?;
    // One copy of the whole output, which the records produced may share.
    let bytes = Bytes::copy_from_slice(bytes);
    let entries = match abi::decode_output_with(&bytes, |v| build(&bytes, v)) {
        Ok(Ok(entries)) => entries,
        Ok(Err(message)) => {
            return Err(Fault::new(
                FaultKind::BadOutput,
                format!("the plugin failed the whole batch: {message}"),
            ))
        }
        Err(e) => {
            return Err(Fault::new(
                FaultKind::BadOutput,
                format!("the plugin returned malformed output: {e}"),
            ))
        }
    };
    if let Some(bad) = entries.iter().find(|e| e.input_index as usize >= count) {
        return Err(Fault::new(
            FaultKind::BadOutput,
            format!(
                "the plugin returned a result for input {} of a batch of {count}",
                bad.input_index
            ),
        ));
    }
    Ok(entries)
}

fn region(data: &mut [u8], ptr: u32, len: u32) -> Option<&mut [u8]> {
    let start = ptr as usize;
    data.get_mut(start..start.checked_add(len as usize)?)
}

fn absorb<T>(out: &mut Output<T>, entries: Vec<Entry<T>>, base: usize) {
    for e in entries {
        let input_index = base + e.input_index as usize;
        match e.outcome {
            Outcome::Record(record) => out.records.push(Produced {
                input_index,
                record,
            }),
            Outcome::Error(message) => out.dead_letters.push(DeadLetter {
                input_index,
                fault: Fault::new(FaultKind::PluginError, message),
            }),
        }
    }
}

impl Live {
    fn start(inner: &PluginInner) -> Result<Live, Error> {
        let name = || inner.name.to_string();
        let start_err = |message: String| Error::Start {
            name: name(),
            message,
        };
        let mut store = Store::new(&inner.engine, StoreState::new(inner));
        store.limiter(|s| &mut s.limiter);
        let budget = inner.limits.fuel_init;
        store
            .set_fuel(budget)
            .map_err(|e| start_err(format!("{e:#}")))?;
        let instance = inner
            .pre
            .instantiate(&mut store)
            .map_err(|e| start_err(classify(store.data(), &e, budget).message))?;
        let typed = |store: &mut Store<StoreState>, export: &str| {
            instance
                .get_func(&mut *store, export)
                .ok_or_else(|| start_err(format!("`{export}` is not an exported function")))
        };
        let alloc = typed(&mut store, "weir_alloc")?
            .typed::<u32, u32>(&store)
            .map_err(|e| start_err(format!("weir_alloc: {e:#}")))?;
        let process = typed(&mut store, "weir_process")?
            .typed::<(u32, u32), u64>(&store)
            .map_err(|e| start_err(format!("weir_process: {e:#}")))?;
        let memory = instance
            .get_memory(&mut store, "memory")
            .ok_or_else(|| start_err("the module exports no memory named `memory`".into()))?;
        let mut live = Live {
            store,
            memory,
            alloc,
            process,
        };
        if inner.has_init {
            let init = typed(&mut live.store, "weir_init")?
                .typed::<(u32, u32), u64>(&live.store)
                .map_err(|e| start_err(format!("weir_init: {e:#}")))?;
            live.init(inner, init, budget)?;
        }
        Ok(live)
    }

    fn init(
        &mut self,
        inner: &PluginInner,
        init: TypedFunc<(u32, u32), u64>,
        budget: u64,
    ) -> Result<(), Error> {
        let config = &inner.config_json;
        let start_err = |message: String| Error::Start {
            name: inner.name.to_string(),
            message,
        };
        let len = u32::try_from(config.len())
            .map_err(|_| start_err("the config is over 4 GiB".into()))?;
        self.store.data_mut().begin_call();
        let ptr = self
            .alloc
            .call(&mut self.store, len)
            .map_err(|e| start_err(classify(self.store.data(), &e, budget).message))?;
        let dest = region(self.memory.data_mut(&mut self.store), ptr, len).ok_or_else(|| {
            start_err(format!(
                "weir_alloc({len}) returned {ptr}, outside the module's memory"
            ))
        })?;
        dest.copy_from_slice(config);
        let packed = init
            .call(&mut self.store, (ptr, len))
            .map_err(|e| start_err(classify(self.store.data(), &e, budget).message))?;
        self.store.data_mut().end_call();
        let (optr, olen) = abi::unpack_ptr_len(packed);
        let data = self.memory.data(&self.store);
        let bytes = data
            .get(optr as usize..(optr as usize).saturating_add(olen as usize))
            .ok_or_else(|| {
                start_err(format!(
                    "weir_init returned its result at {optr}+{olen}, outside the module's memory"
                ))
            })?;
        match abi::decode_init_result(bytes) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(Error::Init {
                name: inner.name.to_string(),
                message,
            }),
            Err(e) => Err(start_err(format!(
                "weir_init returned a malformed result: {e}"
            ))),
        }
    }
}
