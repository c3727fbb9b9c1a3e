"""Layer-wise fusion (docs/design.md section 3b) as tensor-core GEMMs with fused epilogues.

For text states x (M tokens, D) and K token-aligned modalities m_i (M, D_i):

    gate_i = [x; m_i] W_gi^T + b_gi          W_gi = [W_gxi | W_gmi]: (D, D + D_i)
    proj_i = m_i W_pi^T + b_pi               W_pi: (D, D_i)
    shift  = sum_i relu(gate_i) * proj_i
    alpha  = min(beta ||x|| / (||shift|| + eps), 1)       per token
    y      = dropout(LN(x + alpha shift))

At BERT widths the gate's x part is a D x D GEMM per modality: 2 M D (D + 2 D_i) FLOP per
modality, about 44 GFLOP at M = 16384, D = 768 with two modalities (74 and 35 wide), against
about 57 MB of least traffic. That is tensor-core work (design rule 5), so every product runs
as a GEMM tile: a program owns a [BLOCK_M, BLOCK_N] output tile and walks its reduction in
BLOCK_K steps (runtime.gemm_tiles), with the elementwise work in the epilogue. What needs whole
rows (the norms behind alpha, the LayerNorm) runs in light row passes that stream d in chunks
(runtime.stream_tiles).

Modalities and their biases reach the kernels as tuples (one pointer per modality, their widths
as a tuple of ints), the weights as one packed buffer with a tuple of offsets: the kernels loop
over modalities with tl.static_range, so a fifth modality is a longer tuple, not new code. The
parameter gradients go to one flat buffer placed by gradient_layout, whose offsets come as a
tuple of ints too. Layouts are computed once per shape (functools.lru_cache); nothing is copied
from the host.

forward, 3 launches
  fusion_pack_kernel        the gate and projection weights, copied into the packed buffer in
                            the operand dtype with 16-element-aligned rows (weight_layout says
                            why); about 3 MB at D = 768, and what backward's GEMMs read too.
  fusion_shift_kernel       shift tile = sum_i relu(gate_i) * proj_i, gate_i and proj_i
                            accumulated on tensor cores (16-bit operands, fp32 accumulators);
                            the shift is written once, in the operand dtype.
  fusion_norm_kernel        row pass: ||x||, ||shift|| and the moments of o = x + alpha shift
                            (one sweep, about each row's first-chunk means so nothing cancels),
                            then y = dropout(LN(o)); saves 5 row scalars for backward.
  The shift's round trip costs 2 e M D bytes (e: operand size; 50 MB at M = 16384, D = 768 in
  bf16, about 10 us at 5 TB/s) beside the GEMMs' ~44 GFLOP (about 60 us at 750 TFLOP/s); the
  alternative, a program owning whole rows, leaves most SMs idle at 4,096 tokens. Training keeps
  the shift for backward (M x D in the operand dtype): backward then needs no GEMM before its
  row reductions.
backward, 5 launches (fewer when x, the modalities or the parameters need no gradient)
  fusion_bwd_rows_kernel    row pass over dy, x, shift: the LayerNorm's and alpha's row
                            reductions, as four row scalars; the LayerNorm parameters' column
                            sums per row block.
  fusion_bwd_gate_kernel    GEMM tiles recomputing gate_i and proj_i; epilogue d_shift from the
                            row scalars, then d gate_i = d_shift proj_i [gate_i > 0] and
                            d proj_i = d_shift relu(gate_i), written to the workspace.
  fusion_bwd_input_kernel   GEMM tiles dx = sum_i d gate_i W_gxi (+ the LayerNorm/alpha part,
                            elementwise in the epilogue) and dm_i = d gate_i W_gmi + d proj_i W_pi.
  fusion_bwd_weight_kernel  the weight gradients as GEMMs over tokens (d gate_i^T [x; m_i],
                            d proj_i^T m_i, bias column sums, the LayerNorm's partials), split
                            over tokens in a number of ranges fixed by the shape: fp32 partials.
  reduce_partials_kernel    sums the splits in a fixed order (deterministic), in the
                            parameters' dtype.
  Workspace: d gate_i and d proj_i for every token, 2 K M D elements in the operand dtype (16-bit
  under bf16/fp16 and autocast: 96 MiB at M = 16384, D = 768, K = 2; half the fp32 workspace it
  replaces). It is the one tensor that carries the d-wide reduction from the gate tiles into
  both the input GEMMs (which reduce over d) and the weight GEMMs (which reduce over tokens);
  recomputing it would cost the forward GEMMs again per consumer. It lives only during
  backward, and is smaller than what the eager module's autograd keeps from forward to
  backward (the concatenated [x; m_i], the gate and the projection of every modality).
"""

import triton
import triton.language as tl

from .common import dropout_keep, select, sum_partials, walk_chunk

# Row scalars the forward saves, (NUM_STATS, M) fp32: alpha, mean and rstd of o = x + alpha shift,
# ||x||, ||shift||. The backward's row pass hands on (NUM_ROWGRAD, M): mean(g), mean(g o_hat) (g =
# dLN/d o_hat), and the coefficients of x and shift in alpha's gradient.
NUM_STATS, NUM_ROWGRAD = 5, 4


# ----------------------------------------------------------------------------- shared pieces
# (Few and coarse: Triton's interpreter, which runs the tests on the CPU, pays milliseconds per call of a
# jit helper, so loops call none and tile indices are inline arithmetic, not tl.cdiv.)

@triton.jit
def _gate_proj_tile(x_ptr, m_ptr, Dm, wx_ptr, SX, wm_ptr, wp_ptr, SM, bg_ptr, bp_ptr, rows, row_mask, cols, col_mask,
                    D, op, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """(gate, proj) of one modality on a [BLOCK_M, BLOCK_N] tile of output features ``cols``, fp32:
    gate = x W_gx^T + m W_gm^T + b_g (K-loop over x's D columns, then m's Dm), proj = m W_p^T + b_p, the
    weights from the packed buffer (row strides SX, SM). x and m are converted to ``op`` as they are loaded."""
    kk = tl.arange(0, BLOCK_K)
    gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    a_ptrs = x_ptr + rows[:, None] * D + kk[None, :]
    w_ptrs = wx_ptr + cols[None, :] * SX + kk[:, None]  # [BLOCK_K, BLOCK_N] of W_gx^T
    for k0 in range(0, D, BLOCK_K):
        k_mask = kk < D - k0
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        gate = tl.dot(a.to(op), w, acc=gate, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    proj = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    a_ptrs = m_ptr + rows[:, None] * Dm + kk[None, :]
    w_ptrs = wm_ptr + cols[None, :] * SM + kk[:, None]
    p_ptrs = wp_ptr + cols[None, :] * SM + kk[:, None]
    for k0 in range(0, Dm, BLOCK_K):
        k_mask = kk < Dm - k0
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0).to(op)
        w_mask = k_mask[:, None] & col_mask[None, :]
        gate = tl.dot(a, tl.load(w_ptrs, mask=w_mask, other=0.0), acc=gate, input_precision=PRECISION)
        proj = tl.dot(a, tl.load(p_ptrs, mask=w_mask, other=0.0), acc=proj, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
        p_ptrs += BLOCK_K
    gate += tl.load(bg_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    proj += tl.load(bp_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return gate, proj


@triton.jit
def _o_grad_tile(dy_ptr, x_ptr, s_ptr, ln_w_ptr, stats_ptr, rowgrad_ptr, seed_ptr, p_drop, rows, row_mask, cols,
                 col_mask, M, D, HAS_DROPOUT: tl.constexpr):
    """(d_o, x, shift, alpha, coef_x, coef_s) on a tile, exact from the row scalars: d_o is the gradient of
    o = x + alpha shift; dx gets d_o + coef_x x from it directly, d shift = alpha d_o + coef_s shift."""
    alpha = tl.load(stats_ptr + rows, mask=row_mask, other=0.0)
    mean = tl.load(stats_ptr + M + rows, mask=row_mask, other=0.0)
    rstd = tl.load(stats_ptr + 2 * M + rows, mask=row_mask, other=0.0)
    mean_g = tl.load(rowgrad_ptr + rows, mask=row_mask, other=0.0)
    mean_go = tl.load(rowgrad_ptr + M + rows, mask=row_mask, other=0.0)
    coef_x = tl.load(rowgrad_ptr + 2 * M + rows, mask=row_mask, other=0.0)
    coef_s = tl.load(rowgrad_ptr + 3 * M + rows, mask=row_mask, other=0.0)
    offs = rows[:, None] * D + cols[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        g = tl.where(dropout_keep(tl.load(seed_ptr), offs, p_drop), g / (1.0 - p_drop), 0.0)
    g = g * tl.load(ln_w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    ohat = tl.where(mask, (x + alpha[:, None] * s - mean[:, None]) * rstd[:, None], 0.0)
    d_o = tl.where(mask, (g - mean_g[:, None] - ohat * mean_go[:, None]) * rstd[:, None], 0.0)
    return d_o, x, s, alpha, coef_x, coef_s


# ----------------------------------------------------------------------------- forward

@triton.jit
def fusion_pack_kernel(
    gate_w, proj_w,                 # tuples of K: (D, D + D_i) = [W_gx | W_gm], (D, D_i)
    widths,                         # tuple of the K widths D_i
    pack_ptr,                       # out: the packed weights, in the tensor-core operand dtype
    woffsets,                       # tuple: per modality the offsets of its W_gx (D, SX), W_gm and W_p (D, S_i) blocks
    wstrides,                       # tuple of the K row strides S_i (D_i rounded up to 16)
    D, SX,                          # SX: D rounded up to 16
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Copies BLOCK_R rows of every modality's weights into the packed buffer."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < D
    for i in tl.static_range(len(gate_w)):
        Dm = widths[i]
        for c0 in range(0, D + Dm, BLOCK_C):  # a gate row: its first D columns to W_gx, the rest to W_gm
            cols = c0 + tl.arange(0, BLOCK_C)
            mask = row_mask[:, None] & (cols < D + Dm)[None, :]
            w = tl.load(gate_w[i] + rows[:, None] * (D + Dm) + cols[None, :], mask=mask)
            to = tl.where(cols < D, woffsets[3 * i] + rows[:, None] * SX + cols[None, :],
                          woffsets[3 * i + 1] + rows[:, None] * wstrides[i] + (cols - D)[None, :])
            tl.store(pack_ptr + to, w.to(pack_ptr.dtype.element_ty), mask=mask)
        for c0 in range(0, Dm, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            mask = row_mask[:, None] & (cols < Dm)[None, :]
            w = tl.load(proj_w[i] + rows[:, None] * Dm + cols[None, :], mask=mask)
            tl.store(pack_ptr + woffsets[3 * i + 2] + rows[:, None] * wstrides[i] + cols[None, :],
                     w.to(pack_ptr.dtype.element_ty), mask=mask)


@triton.jit
def fusion_shift_kernel(
    x_ptr,                          # (M, D) text states
    mods,                           # tuple of K modalities, (M, D_i) each
    widths,                         # tuple of the K widths D_i
    pack_ptr, woffsets, wstrides,   # the packed weights (fusion_pack_kernel)
    SX,
    gate_b, proj_b,                 # tuples of K biases, (D,) each
    s_ptr,                          # out: (M, D) shift, in the tensor-core operand dtype
    M, D,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    col_blocks = (D + BLOCK_N - 1) // BLOCK_N  # the column tiles of a row block run one after another: x from L2
    rows = (tl.program_id(0) // col_blocks).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (tl.program_id(0) % col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, col_mask = rows < M, cols < D
    op = s_ptr.dtype.element_ty
    shift = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for i in tl.static_range(len(mods)):
        gate, proj = _gate_proj_tile(x_ptr, mods[i], widths[i], pack_ptr + woffsets[3 * i], SX,
                                     pack_ptr + woffsets[3 * i + 1], pack_ptr + woffsets[3 * i + 2], wstrides[i],
                                     gate_b[i], proj_b[i], rows, row_mask, cols, col_mask, D, op, PRECISION, BLOCK_M,
                                     BLOCK_N, BLOCK_K)
        shift += tl.maximum(gate, 0.0) * proj
    tl.store(s_ptr + rows[:, None] * D + cols[None, :], shift.to(op), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def fusion_norm_kernel(
    x_ptr, s_ptr,                   # (M, D) text states and shift
    y_ptr,                          # out: (M, D)
    stats_ptr,                      # out when SAVE: (NUM_STATS, M) fp32 row scalars
    ln_w_ptr, ln_b_ptr,             # (D,) the fusion layer's own LayerNorm
    seed_ptr, p_drop,               # dropout when HAS_DROPOUT: Philox seed (int64, 1 element), probability
    M, D,
    beta, eps, ln_eps,
    HAS_DROPOUT: tl.constexpr,
    SAVE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,          # columns per chunk
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    # sweep 1: the norms, and the moments of o = x + alpha shift from sums about per-row shifts (the first
    # chunk's means of x and of the shift), so that a row's large common value does not cancel its variance
    cols = tl.arange(0, BLOCK_D)
    mask = row_mask[:, None] & (cols < D)[None, :]
    first = tl.minimum(D, BLOCK_D)
    c_x = tl.sum(tl.load(x_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32), 1) / first
    c_s = tl.sum(tl.load(s_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32), 1) / first
    xx = tl.zeros([BLOCK_M], dtype=tl.float32)
    ss = tl.zeros([BLOCK_M], dtype=tl.float32)
    su = tl.zeros([BLOCK_M], dtype=tl.float32)
    sv = tl.zeros([BLOCK_M], dtype=tl.float32)
    suu = tl.zeros([BLOCK_M], dtype=tl.float32)
    suv = tl.zeros([BLOCK_M], dtype=tl.float32)
    svv = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c0 in range(0, D, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols < D)[None, :]
        offs = rows[:, None] * D + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.where(mask, x - c_x[:, None], 0.0)
        v = tl.where(mask, s - c_s[:, None], 0.0)
        xx += tl.sum(x * x, axis=1)
        ss += tl.sum(s * s, axis=1)
        su += tl.sum(u, axis=1)
        sv += tl.sum(v, axis=1)
        suu += tl.sum(u * u, axis=1)
        suv += tl.sum(u * v, axis=1)
        svv += tl.sum(v * v, axis=1)
    x_norm = tl.sqrt(xx)
    s_norm = tl.sqrt(ss)
    alpha = tl.minimum(beta * x_norm / (s_norm + eps), 1.0)
    mu = (su + alpha * sv) / D  # mean of o - (c_x + alpha c_s)
    var = tl.maximum((suu + 2.0 * alpha * suv + alpha * alpha * svv) / D - mu * mu, 0.0)
    mean = c_x + alpha * c_s + mu
    rstd = 1.0 / tl.sqrt(var + ln_eps)
    if SAVE:
        tl.store(stats_ptr + rows, alpha, mask=row_mask)
        tl.store(stats_ptr + M + rows, mean, mask=row_mask)
        tl.store(stats_ptr + 2 * M + rows, rstd, mask=row_mask)
        tl.store(stats_ptr + 3 * M + rows, x_norm, mask=row_mask)
        tl.store(stats_ptr + 4 * M + rows, s_norm, mask=row_mask)
    # sweep 2 (x and the shift again, from L2, from the chunk sweep 1 read last): y
    for i in range(0, tl.cdiv(D, BLOCK_D)):
        c0, _before = walk_chunk(i, D, True, BLOCK_D)
        cols = c0 + tl.arange(0, BLOCK_D)
        col_mask = cols < D
        mask = row_mask[:, None] & col_mask[None, :]
        offs = rows[:, None] * D + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(ln_w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        b = tl.load(ln_b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        y = (x + alpha[:, None] * s - mean[:, None]) * rstd[:, None] * w[None, :] + b[None, :]
        if HAS_DROPOUT:
            y = tl.where(dropout_keep(tl.load(seed_ptr), offs, p_drop), y / (1.0 - p_drop), 0.0)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- backward

@triton.jit
def fusion_bwd_rows_kernel(
    dy_ptr, x_ptr, s_ptr,           # (M, D): gradient of y, text states, the forward's shift
    stats_ptr,                      # (NUM_STATS, M) the forward's row scalars
    rowgrad_ptr,                    # out: (NUM_ROWGRAD, M) fp32 row scalars of the gradient
    ln_part_ptr,                    # out when LN_GRAD: (programs, 2, D) fp32 column sums of dln o_hat, dln
    ln_w_ptr,                       # (D,) LayerNorm weight
    seed_ptr, p_drop,               # dropout, as in the forward
    M, D,
    beta, eps,
    HAS_DROPOUT: tl.constexpr,
    LN_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    alpha = tl.load(stats_ptr + rows, mask=row_mask, other=0.0)
    mean = tl.load(stats_ptr + M + rows, mask=row_mask, other=0.0)
    rstd = tl.load(stats_ptr + 2 * M + rows, mask=row_mask, other=0.0)
    x_norm = tl.load(stats_ptr + 3 * M + rows, mask=row_mask, other=0.0)
    s_norm = tl.load(stats_ptr + 4 * M + rows, mask=row_mask, other=0.0)
    sum_g = tl.zeros([BLOCK_M], dtype=tl.float32)
    sum_go = tl.zeros([BLOCK_M], dtype=tl.float32)
    sum_gs = tl.zeros([BLOCK_M], dtype=tl.float32)
    sum_s = tl.zeros([BLOCK_M], dtype=tl.float32)
    sum_os = tl.zeros([BLOCK_M], dtype=tl.float32)
    part = ln_part_ptr + pid.to(tl.int64) * 2 * D
    for c0 in range(0, D, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        col_mask = cols < D
        mask = row_mask[:, None] & col_mask[None, :]
        offs = rows[:, None] * D + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dln = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            dln = tl.where(dropout_keep(tl.load(seed_ptr), offs, p_drop), dln / (1.0 - p_drop), 0.0)
        ohat = tl.where(mask, (x + alpha[:, None] * s - mean[:, None]) * rstd[:, None], 0.0)
        g = dln * tl.load(ln_w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        sum_g += tl.sum(g, axis=1)
        sum_go += tl.sum(g * ohat, axis=1)
        sum_gs += tl.sum(g * s, axis=1)
        sum_s += tl.sum(s, axis=1)
        sum_os += tl.sum(ohat * s, axis=1)
        if LN_GRAD:  # this row block's share of the LayerNorm parameters' gradients
            tl.store(part + cols, tl.sum(dln * ohat, axis=0), mask=col_mask)
            tl.store(part + D + cols, tl.sum(dln, axis=0), mask=col_mask)
    mean_g = sum_g / D
    mean_go = sum_go / D
    # d alpha = sum_n d_o shift with d_o = rstd (g - mean(g) - o_hat mean(g o_hat))
    d_alpha = rstd * (sum_gs - mean_g * sum_s - mean_go * sum_os)
    # alpha = beta ||x|| / (||s|| + eps) where not clamped at 1 (there it has no gradient)
    free = beta * x_norm / (s_norm + eps) < 1.0
    denom = s_norm + eps
    coef_x = tl.where(free & (x_norm > 0), d_alpha * beta / (denom * tl.maximum(x_norm, 1e-30)), 0.0)
    coef_s = tl.where(free & (s_norm > 0), -d_alpha * beta * x_norm / (denom * denom * tl.maximum(s_norm, 1e-30)),
                      0.0)
    tl.store(rowgrad_ptr + rows, mean_g, mask=row_mask)
    tl.store(rowgrad_ptr + M + rows, mean_go, mask=row_mask)
    tl.store(rowgrad_ptr + 2 * M + rows, coef_x, mask=row_mask)
    tl.store(rowgrad_ptr + 3 * M + rows, coef_s, mask=row_mask)


@triton.jit
def fusion_bwd_gate_kernel(
    dy_ptr, x_ptr, s_ptr,           # (M, D)
    stats_ptr, rowgrad_ptr,         # the forward's and fusion_bwd_rows_kernel's row scalars
    ln_w_ptr, seed_ptr, p_drop,
    mods, widths,                   # as in fusion_shift_kernel
    pack_ptr, woffsets, wstrides, SX,
    gate_b, proj_b,
    ws_ptr,                         # out: (2 K, M, D) in the operand dtype: d gate_i (plane 2i), d proj_i (2i + 1)
    M, D,
    HAS_DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    col_blocks = (D + BLOCK_N - 1) // BLOCK_N
    rows = (tl.program_id(0) // col_blocks).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (tl.program_id(0) % col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, col_mask = rows < M, cols < D
    op = ws_ptr.dtype.element_ty
    d_o, _x, s, alpha, _coef_x, coef_s = _o_grad_tile(dy_ptr, x_ptr, s_ptr, ln_w_ptr, stats_ptr, rowgrad_ptr, seed_ptr,
                                                      p_drop, rows, row_mask, cols, col_mask, M, D, HAS_DROPOUT)
    d_shift = alpha[:, None] * d_o + coef_s[:, None] * s
    mask = row_mask[:, None] & col_mask[None, :]
    for i in tl.static_range(len(mods)):
        gate, proj = _gate_proj_tile(x_ptr, mods[i], widths[i], pack_ptr + woffsets[3 * i], SX,
                                     pack_ptr + woffsets[3 * i + 1], pack_ptr + woffsets[3 * i + 2], wstrides[i],
                                     gate_b[i], proj_b[i], rows, row_mask, cols, col_mask, D, op, PRECISION, BLOCK_M,
                                     BLOCK_N, BLOCK_K)
        d_gate = tl.where(gate > 0.0, d_shift * proj, 0.0)
        d_proj = d_shift * tl.maximum(gate, 0.0)
        # the workspace as a (2 K M, D) matrix: plane j starts at row j M
        tl.store(ws_ptr + ((2 * i) * M + rows)[:, None] * D + cols[None, :], d_gate.to(op), mask=mask)
        tl.store(ws_ptr + ((2 * i + 1) * M + rows)[:, None] * D + cols[None, :], d_proj.to(op), mask=mask)


@triton.jit
def _workspace_dot(acc, ws_ptr, plane, w_ptr, w_stride, rows, row_mask, cols, col_mask, M, D, PRECISION: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """acc + ws[plane][rows, :] W[:, cols] over the D features (W: a packed (D, w_stride) block): the gradient
    of a GEMM's input."""
    nn = tl.arange(0, BLOCK_K)
    a_ptrs = ws_ptr + (plane * M + rows)[:, None] * D + nn[None, :]
    w_ptrs = w_ptr + nn[:, None] * w_stride + cols[None, :]
    for n0 in range(0, D, BLOCK_K):
        n_mask = nn < D - n0
        a = tl.load(a_ptrs, mask=row_mask[:, None] & n_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=n_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a, w, acc=acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * w_stride
    return acc


@triton.jit
def fusion_bwd_input_kernel(
    ws_ptr,                         # fusion_bwd_gate_kernel's workspace
    widths,                         # as in fusion_shift_kernel
    pack_ptr, woffsets, wstrides, SX,
    dy_ptr, x_ptr, s_ptr,           # for dx's elementwise part (the LayerNorm's and alpha's)
    stats_ptr, rowgrad_ptr, ln_w_ptr, seed_ptr, p_drop,
    dx_ptr,                         # out when X_GRAD: (M, D) in x's dtype
    dmods,                          # out when MOD_GRAD: tuple of K (M, D_i), each in its modality's dtype
    M, D,
    jobs,                           # column tiles per row block: D's (X_GRAD), then each D_i's (MOD_GRAD)
    HAS_DROPOUT: tl.constexpr,
    X_GRAD: tl.constexpr,
    MOD_GRAD: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = (tl.program_id(0) // jobs).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # a row block's tiles run
    row_mask = rows < M                                                                # together: its workspace
    job = tl.program_id(0) % jobs                                                      # rows come from L2
    start = 0
    if X_GRAD:
        start = (D + BLOCK_N - 1) // BLOCK_N
        if job < start:
            cols = job * BLOCK_N + tl.arange(0, BLOCK_N)
            col_mask = cols < D
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for i in tl.static_range(len(widths)):
                acc = _workspace_dot(acc, ws_ptr, 2 * i, pack_ptr + woffsets[3 * i], SX, rows, row_mask, cols,
                                     col_mask, M, D, PRECISION, BLOCK_K)
            d_o, x, _s, _alpha, coef_x, _coef_s = _o_grad_tile(dy_ptr, x_ptr, s_ptr, ln_w_ptr, stats_ptr, rowgrad_ptr,
                                                               seed_ptr, p_drop, rows, row_mask, cols, col_mask, M, D,
                                                               HAS_DROPOUT)
            dx = acc + d_o + coef_x[:, None] * x
            tl.store(dx_ptr + rows[:, None] * D + cols[None, :], dx.to(dx_ptr.dtype.element_ty),
                     mask=row_mask[:, None] & col_mask[None, :])
    if MOD_GRAD:
        for i in tl.static_range(len(widths)):
            Dm = widths[i]
            blocks = (Dm + BLOCK_N - 1) // BLOCK_N
            if (job >= start) & (job < start + blocks):
                cols = (job - start) * BLOCK_N + tl.arange(0, BLOCK_N)
                col_mask = cols < Dm
                acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                acc = _workspace_dot(acc, ws_ptr, 2 * i, pack_ptr + woffsets[3 * i + 1], wstrides[i], rows, row_mask,
                                     cols, col_mask, M, D, PRECISION, BLOCK_K)
                acc = _workspace_dot(acc, ws_ptr, 2 * i + 1, pack_ptr + woffsets[3 * i + 2], wstrides[i], rows,
                                     row_mask, cols, col_mask, M, D, PRECISION, BLOCK_K)
                dm = dmods[i]
                tl.store(dm + rows[:, None] * Dm + cols[None, :], acc.to(dm.dtype.element_ty),
                         mask=row_mask[:, None] & col_mask[None, :])
            start += blocks


@triton.jit
def _weight_tile(ws_ptr, plane, a_ptr, A, out_w, out_stride, out_col0, out_b, tile, t0, t1, M, D, op,
                 PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr):
    """Tile ``tile`` (row-major over [D / BLOCK_N, A / BLOCK_C] tiles) of sum_t ws[plane][t, :]^T a[t, :] over
    the tokens t0 <= t < t1, a being (M, A): stored at out_w[n, out_col0 + c]. The tiles of column block 0
    also store the column sums of ws[plane] (a bias gradient) at out_b, unless out_b is None."""
    c_blocks = (A + BLOCK_C - 1) // BLOCK_C
    n = (tile // c_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    c = (tile % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    n_mask, c_mask = n < D, c < A
    acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    col_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    tt = tl.arange(0, BLOCK_T)
    g_ptrs = ws_ptr + (plane * M + t0 + tt.to(tl.int64))[:, None] * D + n[None, :]
    a_ptrs = a_ptr + (t0 + tt.to(tl.int64))[:, None] * A + c[None, :]
    for t_start in range(t0, t1, BLOCK_T):
        t_mask = tt < t1 - t_start
        g = tl.load(g_ptrs, mask=t_mask[:, None] & n_mask[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=t_mask[:, None] & c_mask[None, :], other=0.0)
        acc = tl.dot(tl.trans(g), a.to(op), acc=acc, input_precision=PRECISION)
        if out_b is not None:
            col_sum += tl.sum(g.to(tl.float32), axis=0)
        g_ptrs += BLOCK_T * D
        a_ptrs += BLOCK_T * A
    tl.store(out_w + n[:, None] * out_stride + out_col0 + c[None, :], acc, mask=n_mask[:, None] & c_mask[None, :])
    if out_b is not None:
        if tile % c_blocks == 0:
            tl.store(out_b + n, col_sum, mask=n_mask)


@triton.jit
def fusion_bwd_weight_kernel(
    ws_ptr,                         # fusion_bwd_gate_kernel's workspace
    x_ptr, mods, widths,            # as in fusion_shift_kernel
    ln_part_ptr,                    # fusion_bwd_rows_kernel's LayerNorm partials, when LN_GRAD
    part_ptr,                       # out: (splits, total) fp32, one row of parameter gradients per token split
    offsets,                        # tuple: per modality the offsets of gate_w, gate_b, proj_w, proj_b; then ln
    starts,                         # tuple: the first tile of each modality's m_i GEMMs, then the LayerNorm's
    M, D, total,
    tokens_per_split,               # a multiple of rows_per_part
    rows_per_part,                  # rows behind one LayerNorm partial (fusion_bwd_rows_kernel's BLOCK_M)
    WEIGHT_GRAD: tl.constexpr,      # the gate and projection parameters' tiles (else only the LayerNorm's)
    LN_GRAD: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,          # output features (rows of a weight) per tile
    BLOCK_C: tl.constexpr,          # input features (columns of a weight) per tile
    BLOCK_T: tl.constexpr,          # tokens per step
):
    """Axis 0 enumerates the tiles of every gradient: d gate_i^T x of every modality (tiles [0, starts[0])),
    then per modality i d gate_i^T m_i and d proj_i^T m_i (from starts[i]), then the LayerNorm's column
    chunks; axis 1 is the token split. One GEMM loop is compiled per operand read (x, then each m_i, whose
    dtypes may differ), each tile picking its plane and output at run time: K + 1 inlined GEMM loops, not
    3 K (a GEMM loop is most of a kernel's compile time). The m_i jobs store the bias gradients, the
    column sums of d gate_i and d proj_i."""
    tile = tl.program_id(0)
    split = tl.program_id(1)
    t0 = split * tokens_per_split
    t1 = tl.minimum(t0 + tokens_per_split, M)
    part = part_ptr + split.to(tl.int64) * total
    op = ws_ptr.dtype.element_ty
    K: tl.constexpr = len(mods)
    n_blocks = (D + BLOCK_N - 1) // BLOCK_N
    if WEIGHT_GRAD:
        if tile < starts[0]:  # d gate_i^T x: gate_w_i's first D columns
            x_tiles = n_blocks * ((D + BLOCK_C - 1) // BLOCK_C)
            i = tile // x_tiles
            _weight_tile(ws_ptr, 2 * i, x_ptr, D, part + select(offsets[0:4 * K:4], i, K), D + select(widths, i, K),
                         0, None, tile - i * x_tiles, t0, t1, M, D, op, PRECISION, BLOCK_N, BLOCK_C, BLOCK_T)
        for i in tl.static_range(K):
            if (tile >= starts[i]) & (tile < starts[i + 1]):  # d gate_i^T m_i (gate_w_i's last columns), d proj_i^T m_i
                Dm = widths[i]
                m_tiles = n_blocks * ((Dm + BLOCK_C - 1) // BLOCK_C)
                proj = tile - starts[i] >= m_tiles
                _weight_tile(ws_ptr, 2 * i + proj.to(tl.int32), mods[i], Dm,
                             part + tl.where(proj, offsets[4 * i + 2], offsets[4 * i]), tl.where(proj, Dm, D + Dm),
                             tl.where(proj, 0, D), part + tl.where(proj, offsets[4 * i + 3], offsets[4 * i + 1]),
                             tile - starts[i] - tl.where(proj, m_tiles, 0), t0, t1, M, D, op, PRECISION, BLOCK_N,
                             BLOCK_C, BLOCK_T)
    if LN_GRAD:
        if tile >= starts[K]:  # this split's LayerNorm partials, summed in order
            cols = (tile - starts[K]) * BLOCK_N + tl.arange(0, BLOCK_N)
            col_mask = cols < D
            dw = tl.zeros([BLOCK_N], dtype=tl.float32)
            db = tl.zeros([BLOCK_N], dtype=tl.float32)
            for p in range(t0 // rows_per_part, (t1 + rows_per_part - 1) // rows_per_part):
                dw += tl.load(ln_part_ptr + p * (2 * D) + cols, mask=col_mask, other=0.0)
                db += tl.load(ln_part_ptr + p * (2 * D) + D + cols, mask=col_mask, other=0.0)
            tl.store(part + offsets[4 * K] + cols, dw, mask=col_mask)
            tl.store(part + offsets[4 * K + 1] + cols, db, mask=col_mask)


# ----------------------------------------------------------------------------- launchers

import functools  # noqa: E402  (below the kernels: they need only triton)

import torch  # noqa: E402

from . import runtime  # noqa: E402
from .runtime import cdiv  # noqa: E402


def _round16(n):
    return cdiv(n, 16) * 16


@functools.lru_cache(maxsize=None)
def weight_layout(D, widths):
    """(woffsets, wstrides, SX, total) of the packed weights: per modality i a W_gx block (D, SX), then W_gm
    and W_p blocks (D, S_i), row strides rounded up to 16 elements and blocks starting at multiples of 16.
    A parameter's own rows are D + D_i wide (842 at BERT-base with 74-wide audio), so their starts are only
    4-byte aligned: tiles of them load element by element and cannot be copied asynchronously into shared
    memory (benchmarks/compile_report showed 255 registers and spills). Packed, every row is 32-byte aligned
    and in the operand dtype, converted once per call rather than in every tile."""
    sx = _round16(D)
    woffsets, wstrides, total = [], [], 0
    for w in widths:
        sm = _round16(w)
        woffsets += [total, total + D * sx, total + D * (sx + sm)]
        wstrides.append(sm)
        total += D * (sx + 2 * sm)
    return tuple(woffsets), tuple(wstrides), sx, total


@functools.lru_cache(maxsize=None)
def gradient_layout(D, widths):
    """(layout, offsets, total) of the backward's flat gradient buffer: layout [(name, offset, shape)]
    with names "gate_w.i", "gate_b.i", "proj_w.i", "proj_b.i" per modality i, then "ln_weight" and
    "ln_bias" (ampfuse.ops.fusion reads it); offsets, the same offsets as the tuple fusion_bwd_weight_kernel
    takes. Computed once per shape."""
    entries = []
    for i, w in enumerate(widths):
        entries += [(f"gate_w.{i}", (D, D + w)), (f"gate_b.{i}", (D,)), (f"proj_w.{i}", (D, w)),
                    (f"proj_b.{i}", (D,))]
    entries += [("ln_weight", (D,)), ("ln_bias", (D,))]
    layout, table, total = runtime.pack_layout([(name, slot, shape) for slot, (name, shape) in enumerate(entries)],
                                               len(entries))
    return layout, tuple(table), total


@runtime.on_tensors_device
def forward(spec, x, mods, params, seed, save):
    """(y, saved) for contiguous x (..., D) and modalities (..., D_i), M tokens: y in the dtype of x promoted with the
    LayerNorm weight's; saved, what backward needs beyond the inputs (the shift in the operand dtype, the
    fp32 row scalars, the packed weights), only when ``save``, else None. ``params``:
    ampfuse.ops.fusion.FusionParams (a tuple per kind, one tensor per modality)."""
    D = x.shape[-1]
    M = x.numel() // D
    op = getattr(torch, spec.operands)
    mods = tuple(mods)
    widths = tuple(m.shape[-1] for m in mods)
    woffsets, wstrides, sx, total = weight_layout(D, widths)
    pack = runtime.empty_output((total,), op, x.device)
    converted = any(t.element_size() > pack.element_size() for t in (x, *mods))
    block_r = 64 if runtime.interpreting() else 8
    runtime.launch(fusion_pack_kernel, (cdiv(D, block_r),),
                   params.gate_w, params.proj_w, widths, pack, woffsets, wstrides, D, sx, BLOCK_R=block_r, BLOCK_C=128)
    gemm = runtime.gemm_tiles(op, 3, converted)
    s = runtime.empty_output(x.shape, op, x.device)
    runtime.launch(fusion_shift_kernel, (cdiv(M, gemm["BLOCK_M"]) * cdiv(D, gemm["BLOCK_N"]),),
                   x, mods, widths, pack, woffsets, wstrides, sx, params.gate_b, params.proj_b, s, M, D, **gemm)
    y = runtime.empty_output(x.shape, torch.promote_types(x.dtype, params.ln_weight.dtype), x.device)
    stats = runtime.empty_output((NUM_STATS, M), torch.float32, x.device) if save else None
    rows = runtime.stream_tiles(op)
    runtime.launch(fusion_norm_kernel, (cdiv(M, rows["BLOCK_M"]),),
                   x, s, y, y if stats is None else stats, params.ln_weight, params.ln_bias,
                   x if seed is None else seed, float(spec.dropout_p), M, D,
                   float(spec.beta), float(spec.eps), float(spec.ln_eps),
                   HAS_DROPOUT=spec.dropout_p > 0, SAVE=save, **rows)
    return y, ((s, stats, pack) if save else None)


@runtime.on_tensors_device
def backward(spec, dy, x, mods, params, saved, seed, x_grad, mod_grad, weight_grad, ln_grad, grad_dtype):
    """(dx, [dm_i], flat) from the forward's inputs and saved tensors: dx when ``x_grad``, the modalities'
    gradients when ``mod_grad``, and when ``weight_grad`` or ``ln_grad`` the parameter gradients in one
    flat buffer of ``grad_dtype`` placed by gradient_layout (the gate and projection slots written when
    ``weight_grad``, the LayerNorm's when ``ln_grad``); None for what is not asked."""
    s, stats, pack = saved
    D = x.shape[-1]
    M = x.numel() // D
    op = s.dtype
    mods = tuple(mods)
    widths = tuple(m.shape[-1] for m in mods)
    woffsets, wstrides, sx, _ = weight_layout(D, widths)
    converted = any(t.element_size() > s.element_size() for t in (x, *mods))
    seed_arg = x if seed is None else seed
    dropout = dict(HAS_DROPOUT=spec.dropout_p > 0)
    rows = runtime.stream_tiles(op)
    row_blocks = cdiv(M, rows["BLOCK_M"])
    rowgrad = runtime.empty_output((NUM_ROWGRAD, M), torch.float32, x.device)
    ln_part = runtime.empty_output((row_blocks, 2, D), torch.float32, x.device) if ln_grad else rowgrad
    runtime.launch(fusion_bwd_rows_kernel, (row_blocks,),
                   dy, x, s, stats, rowgrad, ln_part, params.ln_weight, seed_arg, float(spec.dropout_p), M, D,
                   float(spec.beta), float(spec.eps), LN_GRAD=ln_grad, **dropout, **rows)
    dx = dms = flat = None
    ws = rowgrad  # stands in when no GEMM needs the workspace
    if x_grad or mod_grad or weight_grad:
        gemm = runtime.gemm_tiles(op, 3, converted)
        ws = runtime.empty_output((2 * len(mods), M, D), op, x.device)
        runtime.launch(fusion_bwd_gate_kernel, (cdiv(M, gemm["BLOCK_M"]) * cdiv(D, gemm["BLOCK_N"]),),
                       dy, x, s, stats, rowgrad, params.ln_weight, seed_arg, float(spec.dropout_p), mods, widths,
                       pack, woffsets, wstrides, sx, params.gate_b, params.proj_b, ws, M, D, **dropout, **gemm)
    if x_grad or mod_grad:
        gemm = runtime.gemm_tiles(op, 3, converted)  # dx's epilogue: the accumulator and tiles of dy, x, shift
        jobs = (cdiv(D, gemm["BLOCK_N"]) if x_grad else 0) + (sum(cdiv(w, gemm["BLOCK_N"]) for w in widths)
                                                              if mod_grad else 0)
        dx = runtime.empty_output(x.shape, x.dtype, x.device) if x_grad else None
        dms = [runtime.empty_output(m.shape, m.dtype, m.device) for m in mods] if mod_grad else None
        runtime.launch(fusion_bwd_input_kernel, (cdiv(M, gemm["BLOCK_M"]) * jobs,),
                       ws, widths, pack, woffsets, wstrides, sx, dy, x, s, stats, rowgrad, params.ln_weight,
                       seed_arg, float(spec.dropout_p), ws if dx is None else dx, mods if dms is None else tuple(dms),
                       M, D, jobs, X_GRAD=x_grad, MOD_GRAD=mod_grad, **dropout, **gemm)
    if weight_grad or ln_grad:
        _, offsets, total = gradient_layout(D, widths)
        gemm = runtime.gemm_tiles(op, 1)
        block_n = block_c = gemm["BLOCK_N"]  # a weight's rows and columns per tile
        # the tiles of d gate_i^T x for every modality, then per modality d gate_i^T m_i and d proj_i^T m_i; then
        # the LayerNorm's (fusion_bwd_weight_kernel's order)
        n_blocks = cdiv(D, block_n)
        starts = [len(widths) * n_blocks * cdiv(D, block_c) if weight_grad else 0]
        for w in widths:
            starts.append(starts[-1] + (2 * n_blocks * cdiv(w, block_c) if weight_grad else 0))
        tiles = starts[-1] + (n_blocks if ln_grad else 0)
        splits = runtime.weight_grad_splits(tiles, row_blocks)
        blocks_per_split = cdiv(row_blocks, splits)
        splits = cdiv(row_blocks, blocks_per_split)
        part = runtime.empty_output((splits, total), torch.float32, x.device)
        runtime.launch(fusion_bwd_weight_kernel, (tiles, splits),
                       ws, x, mods, widths, ln_part, part, offsets, tuple(starts), M, D, total,
                       blocks_per_split * rows["BLOCK_M"], rows["BLOCK_M"],
                       WEIGHT_GRAD=weight_grad, LN_GRAD=ln_grad, PRECISION=gemm["PRECISION"], BLOCK_N=block_n,
                       BLOCK_C=block_c, BLOCK_T=gemm["BLOCK_K"],
                       **{k: v for k, v in gemm.items() if k in ("num_warps", "num_stages")})
        flat = sum_partials(part, grad_dtype)
    return dx, dms, flat
