//! `colloquy.ai::Q41LutMatMul`: an ONNX Runtime custom operator multiplying float32 activations by
//! 4-bit Q4_1 weights through lookup tables (T-MAC's idea, kept in float32).
//!
//! The served `cpu-int4-gguf-lut` build's 4-bit products (`model/lut_graph.py` puts it in the
//! graph), ported from the measured C prototype `bench/kernels/q4_1_gemv.c` (`lut_tile`,
//! `q4_1_lut_many`): same math, same weight layout (`model/lut_kernel.py` `lut_layout` writes it).
//!
//! Q4_1: weights `W [N, K]` in blocks of 32 along K, each with a scale `d` and a min `m`
//! (`w = d*q + m`, `q` in 0..15), so
//! `y[n] = sum_b d[n,b] * (q[n,b,:] . x[32b..32b+32]) + m[n,b] * sum(x[32b..32b+32])`.
//! For every group of 4 activations the kernel builds the 16 sums of its subsets; a row's 4-bit
//! values split into 4 bit planes, each plane's 4-bit pattern picks one table entry, and plane k
//! counts 2^k. Sixteen rows are done at once: one `vpermps` looks up 16 rows' entries of a table.
//!
//! Operator contract (domain `colloquy.ai`, version 1):
//! * `A` float32 `[..., K]` (any leading dims, their product M may be 0);
//! * `W` uint32 `[N/16, K/32, 4, 16]`: per 16-row tile, block and pair of groups, one dword per row
//!   whose nibble `4*g + k` is that row's plane-k pattern in group g of the pair;
//! * `D`, `Mn` float32 `[N/16, K/32, 16]`: scales and mins per tile, block and row;
//! * `Y` float32 `[..., N]`.
//!
//! The AVX-512 path is chosen at kernel creation when the CPU has `avx512f`; setting the
//! environment variable `COLLOQUY_Q4_LUT_SCALAR=1` before the session is created forces the
//! portable scalar path instead (for tests, and to compare the two).

use core::ffi::{CStr, c_char, c_int, c_void};
use std::ffi::CString;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};

use ort_sys::{
    ONNXTensorElementDataType, ORT_API_VERSION, OrtApi, OrtApiBase, OrtCustomOp, OrtCustomOpDomain,
    OrtCustomOpInputOutputCharacteristic, OrtErrorCode, OrtKernelContext, OrtKernelInfo,
    OrtMemType, OrtSessionOptions, OrtStatus, OrtStatusPtr, OrtValue,
};

const DOMAIN: &CStr = c"colloquy.ai";
const OP_NAME: &CStr = c"Q41LutMatMul";
const CPU_EP: &CStr = c"CPUExecutionProvider";
/// Environment variable that, set to `1` when a kernel is created, forces the scalar path.
pub const SCALAR_ENV: &str = "COLLOQUY_Q4_LUT_SCALAR";

/// Weights per block, rows per tile, dwords per (tile, block): 4 pairs of groups x 16 rows.
const BLOCK: usize = 32;
const TILE: usize = 16;
const WORDS_PER_BLOCK: usize = 4 * TILE;
/// Floats of lookup table per block: 8 groups of 4 activations, 16 entries each.
const TABLE_PER_BLOCK: usize = 8 * 16;
/// Blocks of work (tiles x K/32) per ParallelFor item when M == 1: enough to dwarf the pool's
/// per-item cost, small enough to balance two to a few threads on SmolLM2's matrices.
const BLOCKS_PER_ITEM: usize = 64;

use ONNXTensorElementDataType::{
    ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT as FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32 as UINT32,
};

/// The operator's description. ORT keeps the pointer we hand it for as long as sessions use the
/// op, so it lives in a `static`. `version` 17 (ort-sys's API without `api-18`) is the layout this
/// struct has: ORT reads no field past `GetEndVersion` for it.
static OP: OrtCustomOp = OrtCustomOp {
    version: ORT_API_VERSION,
    // The V1 entry points cannot report errors; ORT uses the V2 ones below for version >= 16.
    CreateKernel: None,
    GetName: Some(op_name),
    GetExecutionProviderType: Some(op_ep),
    GetInputType: Some(op_input_type),
    GetInputTypeCount: Some(op_input_count),
    GetOutputType: Some(op_output_type),
    GetOutputTypeCount: Some(op_output_count),
    KernelCompute: None,
    KernelDestroy: Some(kernel_destroy),
    GetInputCharacteristic: Some(op_required),
    GetOutputCharacteristic: Some(op_required),
    GetInputMemoryType: Some(op_input_memory),
    // Only consulted for variadic inputs/outputs, which this op has none of.
    GetVariadicInputMinArity: None,
    GetVariadicInputHomogeneity: None,
    GetVariadicOutputMinArity: None,
    GetVariadicOutputHomogeneity: None,
    CreateKernelV2: Some(kernel_create),
    KernelComputeV2: Some(kernel_compute),
    // No shape inference: Y's shape depends on W's (an initializer) and is only known at run time.
    InferOutputShapeFn: None,
    GetStartVersion: Some(op_start_version),
    GetEndVersion: Some(op_end_version),
};

unsafe extern "system" fn op_name(_: *const OrtCustomOp) -> *const c_char {
    OP_NAME.as_ptr()
}

unsafe extern "system" fn op_ep(_: *const OrtCustomOp) -> *const c_char {
    CPU_EP.as_ptr()
}

unsafe extern "system" fn op_input_type(
    _: *const OrtCustomOp,
    index: usize,
) -> ONNXTensorElementDataType {
    if index == 1 { UINT32 } else { FLOAT }
}

unsafe extern "system" fn op_input_count(_: *const OrtCustomOp) -> usize {
    4
}

unsafe extern "system" fn op_output_type(
    _: *const OrtCustomOp,
    _: usize,
) -> ONNXTensorElementDataType {
    FLOAT
}

unsafe extern "system" fn op_output_count(_: *const OrtCustomOp) -> usize {
    1
}

unsafe extern "system" fn op_required(
    _: *const OrtCustomOp,
    _: usize,
) -> OrtCustomOpInputOutputCharacteristic {
    OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_REQUIRED
}

unsafe extern "system" fn op_input_memory(_: *const OrtCustomOp, _: usize) -> OrtMemType {
    OrtMemType::OrtMemTypeDefault
}

unsafe extern "system" fn op_start_version(_: *const OrtCustomOp) -> c_int {
    1
}

unsafe extern "system" fn op_end_version(_: *const OrtCustomOp) -> c_int {
    // ORT's "no upper bound" (INT_MAX): later opset versions of colloquy.ai keep this op.
    c_int::MAX
}

/// The entry point `SessionOptions.register_custom_ops_library` calls: creates the `colloquy.ai`
/// domain with the op and adds it to `options`. The domain is leaked on purpose: ORT only borrows
/// it, and it must outlive every session made from these options.
///
/// # Safety
/// Called by ONNX Runtime with valid `options` and `api_base`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn RegisterCustomOps(
    options: *mut OrtSessionOptions,
    api_base: *const OrtApiBase,
) -> *mut OrtStatus {
    if api_base.is_null() {
        return core::ptr::null_mut(); // nothing to make an error with; ORT never does this
    }
    let api = unsafe { ((*api_base).GetApi)(ORT_API_VERSION) };
    if api.is_null() {
        return core::ptr::null_mut(); // a runtime older than API 17: nothing to report it with either
    }
    let api = unsafe { &*api };
    guarded(api, "panic while registering the op", || unsafe {
        register(api, options)
    })
}

/// Runs `f`, turning its error or a panic (which must not cross the FFI boundary) into an ORT
/// status; null is success.
fn guarded(api: &OrtApi, on_panic: &str, f: impl FnOnce() -> Result<(), Fail>) -> *mut OrtStatus {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => core::ptr::null_mut(),
        Ok(Err(e)) => e.into_status(api),
        Err(_) => {
            Fail::new(OrtErrorCode::ORT_FAIL, format!("Q41LutMatMul: {on_panic}")).into_status(api)
        }
    }
}

unsafe fn register(api: &OrtApi, options: *mut OrtSessionOptions) -> Result<(), Fail> {
    let mut domain: *mut OrtCustomOpDomain = core::ptr::null_mut();
    unsafe {
        check((api.CreateCustomOpDomain)(DOMAIN.as_ptr(), &mut domain))?;
        check((api.CustomOpDomain_Add)(domain, &OP))?;
        check((api.AddCustomOpDomain)(options, domain))
    }
}

/// An error on its way to ORT: either a status ORT gave us, or one we make.
enum Fail {
    Status(*mut OrtStatus),
    New(OrtErrorCode, String),
}

impl Fail {
    fn new(code: OrtErrorCode, msg: impl Into<String>) -> Self {
        Fail::New(code, msg.into())
    }

    fn invalid(msg: impl Into<String>) -> Self {
        Fail::new(OrtErrorCode::ORT_INVALID_ARGUMENT, msg)
    }

    fn into_status(self, api: &OrtApi) -> *mut OrtStatus {
        match self {
            Fail::Status(s) => s,
            Fail::New(code, msg) => {
                let msg = CString::new(msg.replace('\0', " ")).unwrap_or_default();
                unsafe { (api.CreateStatus)(code, msg.as_ptr()).0 }
            }
        }
    }
}

fn check(status: OrtStatusPtr) -> Result<(), Fail> {
    if status.0.is_null() {
        Ok(())
    } else {
        Err(Fail::Status(status.0))
    }
}

/// Per-node state: the API to call back into, and which path computes.
struct Kernel {
    api: *const OrtApi,
    scalar: bool,
}

unsafe extern "system" fn kernel_create(
    _: *const OrtCustomOp,
    api: *const OrtApi,
    _: *const OrtKernelInfo,
    kernel: *mut *mut c_void,
) -> OrtStatusPtr {
    let forced = std::env::var(SCALAR_ENV).is_ok_and(|v| v.trim() == "1");
    let scalar = forced || !avx512_available();
    unsafe { *kernel = Box::into_raw(Box::new(Kernel { api, scalar })).cast() };
    OrtStatusPtr(core::ptr::null_mut())
}

unsafe extern "system" fn kernel_destroy(kernel: *mut c_void) {
    if !kernel.is_null() {
        drop(unsafe { Box::from_raw(kernel.cast::<Kernel>()) });
    }
}

unsafe extern "system" fn kernel_compute(
    kernel: *mut c_void,
    ctx: *mut OrtKernelContext,
) -> OrtStatusPtr {
    let kernel = unsafe { &*kernel.cast::<Kernel>() };
    let api = unsafe { &*kernel.api };
    OrtStatusPtr(guarded(api, "internal error (panic)", || unsafe {
        compute(api, ctx, kernel.scalar)
    }))
}

fn avx512_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Shape and data pointer of input `index`.
unsafe fn input(
    api: &OrtApi,
    ctx: *mut OrtKernelContext,
    index: usize,
) -> Result<(Vec<i64>, *mut c_void), Fail> {
    let mut value: *const OrtValue = core::ptr::null();
    unsafe { check((api.KernelContext_GetInput)(ctx, index, &mut value))? };
    if value.is_null() {
        return Err(Fail::invalid(format!(
            "Q41LutMatMul: input {} ({}) is missing",
            index, INPUT_NAMES[index]
        )));
    }
    let shape = unsafe { shape_of(api, value)? };
    let mut data: *mut c_void = core::ptr::null_mut();
    unsafe { check((api.GetTensorMutableData)(value.cast_mut(), &mut data))? };
    Ok((shape, data))
}

unsafe fn shape_of(api: &OrtApi, value: *const OrtValue) -> Result<Vec<i64>, Fail> {
    let mut info = core::ptr::null_mut();
    unsafe { check((api.GetTensorTypeAndShape)(value, &mut info))? };
    let mut rank = 0usize;
    let mut dims = Vec::new();
    let got = unsafe {
        check((api.GetDimensionsCount)(info, &mut rank)).and_then(|()| {
            dims.resize(rank, 0i64);
            check((api.GetDimensions)(info, dims.as_mut_ptr(), rank))
        })
    };
    unsafe { (api.ReleaseTensorTypeAndShapeInfo)(info) };
    got.map(|()| dims)
}

const INPUT_NAMES: [&str; 4] = ["A", "W", "D", "Mn"];

fn dims(shape: &[i64]) -> String {
    let parts: Vec<String> = shape.iter().map(i64::to_string).collect();
    format!("[{}]", parts.join(", "))
}

/// The op's shapes, checked: everything else trusts them.
#[derive(Clone, Copy)]
struct Dims {
    m: usize,
    n: usize,
    k: usize,
    tiles: usize,
    kb: usize,
}

fn check_shapes(a: &[i64], w: &[i64], d: &[i64], mn: &[i64]) -> Result<Dims, Fail> {
    let bad = |what: &str, expected: String, got: &[i64]| {
        Fail::invalid(format!(
            "Q41LutMatMul: input {what} must have shape {expected}, got {}",
            dims(got)
        ))
    };
    if w.len() != 4 || w[2] != 4 || w[3] != 16 || w[0] < 0 || w[1] < 0 {
        return Err(bad(
            "W",
            "[N/16, K/32, 4, 16] (N a multiple of 16, K of 32)".into(),
            w,
        ));
    }
    let (tiles, kb) = (w[0] as usize, w[1] as usize);
    let (n, k) = (tiles * TILE, kb * BLOCK);
    for (name, got) in [("D", d), ("Mn", mn)] {
        if got != [w[0], w[1], 16] {
            return Err(bad(
                name,
                format!(
                    "[N/16, K/32, 16] = [{}, {}, 16] (from W: N = {n}, K = {k})",
                    w[0], w[1]
                ),
                got,
            ));
        }
    }
    match a.last() {
        Some(&last) if last == k as i64 => {}
        _ => {
            return Err(Fail::invalid(format!(
                "Q41LutMatMul: input A must have shape [..., K] with K = {k} (from W's shape {}), got {}",
                dims(w),
                dims(a)
            )));
        }
    }
    let mut m = 1usize;
    for &x in &a[..a.len() - 1] {
        m = usize::try_from(x)
            .ok()
            .and_then(|x| m.checked_mul(x))
            .ok_or_else(|| {
                Fail::invalid(format!("Q41LutMatMul: input A has a bad shape {}", dims(a)))
            })?;
    }
    Ok(Dims { m, n, k, tiles, kb })
}

unsafe fn compute(api: &OrtApi, ctx: *mut OrtKernelContext, scalar: bool) -> Result<(), Fail> {
    let (a_shape, a_ptr) = unsafe { input(api, ctx, 0)? };
    let (w_shape, w_ptr) = unsafe { input(api, ctx, 1)? };
    let (d_shape, d_ptr) = unsafe { input(api, ctx, 2)? };
    let (mn_shape, mn_ptr) = unsafe { input(api, ctx, 3)? };
    let dm = check_shapes(&a_shape, &w_shape, &d_shape, &mn_shape)?;

    let mut y_shape = a_shape.clone();
    if let Some(last) = y_shape.last_mut() {
        *last = dm.n as i64;
    }
    let mut out: *mut OrtValue = core::ptr::null_mut();
    unsafe {
        check((api.KernelContext_GetOutput)(
            ctx,
            0,
            y_shape.as_ptr(),
            y_shape.len(),
            &mut out,
        ))?
    };
    if dm.m == 0 || dm.n == 0 {
        return Ok(());
    }
    let mut y_ptr: *mut c_void = core::ptr::null_mut();
    unsafe { check((api.GetTensorMutableData)(out, &mut y_ptr))? };
    if y_ptr.is_null() {
        return Err(Fail::new(
            OrtErrorCode::ORT_FAIL,
            "Q41LutMatMul: ORT gave no output buffer",
        ));
    }
    let y = y_ptr.cast::<f32>();
    if dm.kb == 0 {
        unsafe { core::ptr::write_bytes(y, 0, dm.m * dm.n) };
        return Ok(());
    }
    if [a_ptr, w_ptr, d_ptr, mn_ptr].iter().any(|p| p.is_null()) {
        return Err(Fail::new(
            OrtErrorCode::ORT_FAIL,
            "Q41LutMatMul: an input has no data",
        ));
    }
    // Lengths follow from the checked shapes; ORT's buffers are aligned for their element types.
    let job = Job {
        dm,
        a: unsafe { core::slice::from_raw_parts(a_ptr.cast::<f32>(), dm.m * dm.k) },
        w: unsafe {
            core::slice::from_raw_parts(w_ptr.cast::<u32>(), dm.tiles * dm.kb * WORDS_PER_BLOCK)
        },
        d: unsafe { core::slice::from_raw_parts(d_ptr.cast::<f32>(), dm.tiles * dm.kb * TILE) },
        mn: unsafe { core::slice::from_raw_parts(mn_ptr.cast::<f32>(), dm.tiles * dm.kb * TILE) },
        y: OutPtr(y),
        scalar,
    };
    if dm.m == 1 {
        // One row (decode): build its tables once, then split the tiles among the threads.
        let mut tables = vec![0f32; dm.kb * TABLE_PER_BLOCK];
        let mut sums = vec![0f32; dm.kb];
        build_tables(job.a, &mut tables, &mut sums, scalar);
        let per_item = BLOCKS_PER_ITEM.div_ceil(dm.kb).max(1);
        let items = dm.tiles.div_ceil(per_item);
        unsafe {
            parallel_for(api, ctx, items, &|i| {
                let t1 = ((i + 1) * per_item).min(dm.tiles);
                for t in i * per_item..t1 {
                    job.tile(t, &tables, &sums, 0);
                }
            })
        }
    } else {
        // Several rows (prefill, batches): each item is one row, tables and all tiles.
        unsafe {
            parallel_for(api, ctx, dm.m, &|row| {
                let mut tables = vec![0f32; dm.kb * TABLE_PER_BLOCK];
                let mut sums = vec![0f32; dm.kb];
                build_tables(
                    &job.a[row * dm.k..(row + 1) * dm.k],
                    &mut tables,
                    &mut sums,
                    scalar,
                );
                for t in 0..dm.tiles {
                    job.tile(t, &tables, &sums, row);
                }
            })
        }
    }
}

/// `Y`'s buffer, shared by the pool's threads: each writes its own tiles or rows only.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

struct Job<'a> {
    dm: Dims,
    a: &'a [f32],
    w: &'a [u32],
    d: &'a [f32],
    mn: &'a [f32],
    y: OutPtr,
    scalar: bool,
}

impl Job<'_> {
    /// Tile `t` (rows 16t..16t+16) of output row `row`.
    fn tile(&self, t: usize, tables: &[f32], sums: &[f32], row: usize) {
        let kb = self.dm.kb;
        let w = &self.w[t * kb * WORDS_PER_BLOCK..(t + 1) * kb * WORDS_PER_BLOCK];
        let d = &self.d[t * kb * TILE..(t + 1) * kb * TILE];
        let m = &self.mn[t * kb * TILE..(t + 1) * kb * TILE];
        // Disjoint per (row, tile), and in bounds: row < M, 16t + 16 <= N.
        let y = unsafe {
            core::slice::from_raw_parts_mut(self.y.0.add(row * self.dm.n + t * TILE), TILE)
        };
        let tile = Tile {
            w,
            d,
            m,
            tables,
            sums,
            kb,
        };
        lut_tile(&tile, y, self.scalar);
    }
}

/// One 16-row tile's inputs: its weight words, scales and mins for `kb` blocks, and the row's
/// tables and block sums.
struct Tile<'a> {
    w: &'a [u32],
    d: &'a [f32],
    m: &'a [f32],
    tables: &'a [f32],
    sums: &'a [f32],
    kb: usize,
}

/// Runs `f(0..total)` on ORT's intra-op pool (`KernelContext_ParallelFor`), serially when the
/// API has no pool function or it fails (every item only writes its own outputs, so rerunning
/// them all is safe). A panic in an item is caught there and reported as an error.
unsafe fn parallel_for<F: Fn(usize) + Sync>(
    api: &OrtApi,
    ctx: *mut OrtKernelContext,
    total: usize,
    f: &F,
) -> Result<(), Fail> {
    struct Shared<'a, F> {
        f: &'a F,
        panicked: AtomicBool,
    }
    unsafe extern "C" fn item<F: Fn(usize) + Sync>(data: *mut c_void, i: usize) {
        let shared = unsafe { &*data.cast::<Shared<F>>() };
        if catch_unwind(AssertUnwindSafe(|| (shared.f)(i))).is_err() {
            shared.panicked.store(true, Ordering::Relaxed);
        }
    }
    let shared = Shared {
        f,
        panicked: AtomicBool::new(false),
    };
    type ParallelFor = unsafe extern "system" fn(
        *const OrtKernelContext,
        unsafe extern "C" fn(*mut c_void, usize),
        usize,
        usize,
        *mut c_void,
    ) -> OrtStatusPtr;
    // Read the field as nullable: ort-sys types it as a plain fn pointer, which may not be null.
    let pool = unsafe {
        core::ptr::addr_of!(api.KernelContext_ParallelFor)
            .cast::<Option<ParallelFor>>()
            .read()
    };
    let mut done = false;
    if let Some(pool) = pool
        && total > 1
    {
        let data = core::ptr::addr_of!(shared).cast_mut().cast::<c_void>();
        let status = unsafe { pool(ctx, item::<F>, total, 0, data) };
        if status.0.is_null() {
            done = true;
        } else {
            unsafe { (api.ReleaseStatus)(status.0) };
        }
    }
    if !done {
        for i in 0..total {
            unsafe { item::<F>(core::ptr::addr_of!(shared).cast_mut().cast(), i) };
        }
    }
    if shared.panicked.load(Ordering::Relaxed) {
        return Err(Fail::new(
            OrtErrorCode::ORT_FAIL,
            "Q41LutMatMul: internal error (panic in a worker)",
        ));
    }
    Ok(())
}

/// The tables of one activation row `x` (length K): for group g of 4, entry p of
/// `tables[16g..16g+16]` is the sum of the group's activations whose bit is set in p, added in
/// order (as the C kernel's fma chain does, so both paths build identical tables); `sums[b]` is
/// block b's sum (the min term's factor).
fn build_tables(x: &[f32], tables: &mut [f32], sums: &mut [f32], scalar: bool) {
    #[cfg(target_arch = "x86_64")]
    if !scalar && tables.len() >= 4 * x.len() {
        unsafe { avx512::tables(x, tables) };
    } else {
        tables_scalar(x, tables);
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = scalar;
        tables_scalar(x, tables);
    }
    for (s, block) in sums.iter_mut().zip(x.chunks_exact(BLOCK)) {
        *s = block.iter().sum();
    }
}

fn tables_scalar(x: &[f32], tables: &mut [f32]) {
    for (t, g) in tables.chunks_exact_mut(16).zip(x.chunks_exact(4)) {
        for (p, e) in t.iter_mut().enumerate() {
            let mut s = 0f32;
            for (j, &v) in g.iter().enumerate() {
                if p >> j & 1 == 1 {
                    s += v;
                }
            }
            *e = s;
        }
    }
}

/// One 16-row tile over all `kb` blocks into `y[0..16]` (the C `lut_tile`).
fn lut_tile(t: &Tile, y: &mut [f32], scalar: bool) {
    let Tile {
        w,
        d,
        m,
        tables,
        sums,
        kb,
    } = *t;
    // The unsafe path reads these extents; the caller's slicing guarantees them.
    let fits = w.len() >= kb * WORDS_PER_BLOCK
        && d.len() >= kb * TILE
        && m.len() >= kb * TILE
        && tables.len() >= kb * TABLE_PER_BLOCK
        && sums.len() >= kb
        && y.len() >= TILE;
    #[cfg(target_arch = "x86_64")]
    if !scalar && fits {
        unsafe { avx512::tile(t, y) };
        return;
    }
    let _ = (scalar, fits);
    tile_scalar(t, y);
}

/// The portable path, in the AVX-512 path's order: per block, plane sums of the first and second
/// group of each pair, then `8*p3 + 4*p2 + 2*p1 + p0` (exact scalings), then `d*s + m*sum`.
fn tile_scalar(t: &Tile, y: &mut [f32]) {
    let Tile {
        w,
        d,
        m,
        tables,
        sums,
        kb,
    } = *t;
    for (r, out) in y.iter_mut().enumerate().take(TILE) {
        let mut acc = 0f32;
        for b in 0..kb {
            let (mut p, mut q) = ([0f32; 4], [0f32; 4]);
            for pair in 0..4 {
                let v = w[WORDS_PER_BLOCK * b + TILE * pair + r];
                let t = &tables[16 * (8 * b + 2 * pair)..16 * (8 * b + 2 * pair + 2)];
                for k in 0..4 {
                    p[k] += t[(v >> (4 * k) & 15) as usize];
                    q[k] += t[16 + (v >> (4 * k + 16) & 15) as usize];
                }
            }
            for k in 0..4 {
                p[k] += q[k];
            }
            let s = p[3] * 8.0 + (p[2] * 4.0 + (p[1] * 2.0 + p[0]));
            acc += s * d[TILE * b + r];
            acc += m[TILE * b + r] * sums[b];
        }
        *out = acc;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{TABLE_PER_BLOCK, TILE, Tile, WORDS_PER_BLOCK};
    use std::arch::x86_64::*;

    /// AVX-512 table build: 16 entries (one register) per group, `bit_j * x_j` summed by fma.
    ///
    /// # Safety
    /// The CPU has avx512f; `tables.len() >= 4 * x.len()`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn tables(x: &[f32], tables: &mut [f32]) {
        let lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
        let one = _mm512_set1_epi32(1);
        let bit = [
            _mm512_cvtepi32_ps(_mm512_and_si512(lane, one)),
            _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32::<1>(lane), one)),
            _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32::<2>(lane), one)),
            _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32::<3>(lane), one)),
        ];
        for (g, xg) in x.chunks_exact(4).enumerate() {
            let mut t = _mm512_mul_ps(bit[0], _mm512_set1_ps(xg[0]));
            for j in 1..4 {
                t = _mm512_fmadd_ps(bit[j], _mm512_set1_ps(xg[j]), t);
            }
            unsafe { _mm512_storeu_ps(tables.as_mut_ptr().add(16 * g), t) };
        }
    }

    /// AVX-512 `lut_tile`: 16 rows per register; per block 8 short chains of plane sums (first and
    /// second group of each pair, planes 0..3), each lookup one `vpermps` on the shifted dwords
    /// (`vpermps` reads the low 4 bits of each lane, so no mask is needed).
    ///
    /// # Safety
    /// The CPU has avx512f; the slices hold `kb` blocks (see `super::lut_tile`), `y` 16 floats.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile(tile: &Tile, y: &mut [f32]) {
        let Tile {
            w,
            d,
            m,
            tables,
            sums,
            kb,
        } = *tile;
        let (w, d, m, tables) = (w.as_ptr(), d.as_ptr(), m.as_ptr(), tables.as_ptr());
        let mut acc = _mm512_setzero_ps();
        for (b, &sum) in sums.iter().enumerate().take(kb) {
            let zero = _mm512_setzero_ps();
            let (mut p0, mut p1, mut p2, mut p3) = (zero, zero, zero, zero);
            let (mut q0, mut q1, mut q2, mut q3) = (zero, zero, zero, zero);
            for pair in 0..4 {
                let (v, t0, t1) = unsafe {
                    let t = tables.add(TABLE_PER_BLOCK * b + 32 * pair);
                    (
                        _mm512_loadu_si512(w.add(WORDS_PER_BLOCK * b + TILE * pair).cast()),
                        _mm512_loadu_ps(t),
                        _mm512_loadu_ps(t.add(16)),
                    )
                };
                p0 = _mm512_add_ps(p0, _mm512_permutexvar_ps(v, t0));
                p1 = _mm512_add_ps(p1, _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(v), t0));
                p2 = _mm512_add_ps(p2, _mm512_permutexvar_ps(_mm512_srli_epi32::<8>(v), t0));
                p3 = _mm512_add_ps(p3, _mm512_permutexvar_ps(_mm512_srli_epi32::<12>(v), t0));
                q0 = _mm512_add_ps(q0, _mm512_permutexvar_ps(_mm512_srli_epi32::<16>(v), t1));
                q1 = _mm512_add_ps(q1, _mm512_permutexvar_ps(_mm512_srli_epi32::<20>(v), t1));
                q2 = _mm512_add_ps(q2, _mm512_permutexvar_ps(_mm512_srli_epi32::<24>(v), t1));
                q3 = _mm512_add_ps(q3, _mm512_permutexvar_ps(_mm512_srli_epi32::<28>(v), t1));
            }
            let (p0, p1, p2, p3) = (
                _mm512_add_ps(p0, q0),
                _mm512_add_ps(p1, q1),
                _mm512_add_ps(p2, q2),
                _mm512_add_ps(p3, q3),
            );
            let s = _mm512_fmadd_ps(
                p3,
                _mm512_set1_ps(8.0),
                _mm512_fmadd_ps(
                    p2,
                    _mm512_set1_ps(4.0),
                    _mm512_fmadd_ps(p1, _mm512_set1_ps(2.0), p0),
                ),
            );
            let (db, mb) = unsafe {
                (
                    _mm512_loadu_ps(d.add(TILE * b)),
                    _mm512_loadu_ps(m.add(TILE * b)),
                )
            };
            acc = _mm512_fmadd_ps(s, db, acc);
            acc = _mm512_fmadd_ps(mb, _mm512_set1_ps(sum), acc);
        }
        unsafe { _mm512_storeu_ps(y.as_mut_ptr(), acc) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both paths against a direct float64 sum, on a layout built here the slow way.
    #[test]
    fn paths_agree_with_reference() {
        let (n, k) = (32usize, 96usize);
        let (tiles, kb) = (n / TILE, k / BLOCK);
        let mut seed = 12345u64;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as u32
        };
        let q: Vec<u32> = (0..n * k).map(|_| rnd() % 16).collect();
        let dv: Vec<f32> = (0..n * kb).map(|_| (rnd() % 1000) as f32 * 2e-5).collect();
        let mv: Vec<f32> = (0..n * kb)
            .map(|_| -((rnd() % 1000) as f32) * 1e-4)
            .collect();
        let x: Vec<f32> = (0..k)
            .map(|_| (rnd() % 2001) as f32 / 1000.0 - 1.0)
            .collect();
        let mut w = vec![0u32; tiles * kb * WORDS_PER_BLOCK];
        let (mut d, mut m) = (vec![0f32; tiles * kb * TILE], vec![0f32; tiles * kb * TILE]);
        for row in 0..n {
            let (t, r) = (row / TILE, row % TILE);
            for b in 0..kb {
                d[(t * kb + b) * TILE + r] = dv[row * kb + b];
                m[(t * kb + b) * TILE + r] = mv[row * kb + b];
                for pair in 0..4 {
                    let mut word = 0u32;
                    for g in 0..2 {
                        for plane in 0..4 {
                            for j in 0..4 {
                                let v = q[row * k + BLOCK * b + 8 * pair + 4 * g + j];
                                word |= (v >> plane & 1) << (4 * (4 * g + plane) + j);
                            }
                        }
                    }
                    w[((t * kb + b) * 4 + pair) * TILE + r] = word;
                }
            }
        }
        let expect: Vec<f64> = (0..n)
            .map(|row| {
                (0..k)
                    .map(|j| {
                        (dv[row * kb + j / BLOCK] as f64 * q[row * k + j] as f64
                            + mv[row * kb + j / BLOCK] as f64)
                            * x[j] as f64
                    })
                    .sum()
            })
            .collect();
        let scale = expect.iter().fold(0f64, |a, v| a.max(v.abs()));
        let dm = Dims {
            m: 1,
            n,
            k,
            tiles,
            kb,
        };
        let paths: &[bool] = if avx512_available() {
            &[true, false]
        } else {
            &[true]
        };
        for &scalar in paths {
            let mut y = vec![0f32; n];
            let job = Job {
                dm,
                a: &x,
                w: &w,
                d: &d,
                mn: &m,
                y: OutPtr(y.as_mut_ptr()),
                scalar,
            };
            let mut tables = vec![0f32; kb * TABLE_PER_BLOCK];
            let mut sums = vec![0f32; kb];
            build_tables(&x, &mut tables, &mut sums, scalar);
            for t in 0..tiles {
                job.tile(t, &tables, &sums, 0);
            }
            for (a, e) in y.iter().zip(&expect) {
                assert!(
                    (*a as f64 - e).abs() / scale < 1e-5,
                    "scalar={scalar}: {a} vs {e}"
                );
            }
        }
    }
}
