"""Fused GMU adapter (docs/design.md section 3a), streamed over every width.

Streams j = 0 (the text x, width d) .. S-1 (the modalities, widths d_j) are each normalised
(optionally), projected to the bottleneck width k and activated; a gate mixes them; W_up projects
the mix back to d. No row of any width d_j lives in registers (design rule 1): a program owns
BLOCK_M tokens of one sample and walks each width in chunks of BLOCK_D columns; between chunks only
[BLOCK_M, BLOCK_K] tiles and per-row scalars stay on chip. Per-stream arguments travel as tuples
with one element per stream (`Streams`), the static options as one constexpr `Config`, and the
kernels loop over the streams: a fifth modality is one more tuple element, not more code.

forward, 2 launches
  gmu_prep_kernel      per-call constants (CONSTS below): the scaling as a d-vector, each stream's
                       LayerNorm fold vectors f1 = W_j gamma_j and f2 = W_j beta_j + c_j, the column
                       sums of s o W_up; the gate and GMU weights in the operand dtype (WEIGHTS); and
                       the per-sample streams' pre-activations, computed once per sample (B rows, one
                       pass over each row as the token streams', the fold vectors in the same pass),
                       never per token. A latency-bound kernel: each step loads before it computes.
  gmu_fwd_kernel       one pass over each token-aligned input: LN_j is folded into the projection,
                       LN(x) W^T = rstd ((x - c) o gamma) W^T - rstd (mean - c) W gamma + W beta, with c
                       the row's first-chunk mean, so that 16-bit dot operands do not carry the row's
                       mean; the gate on chip, as an online softmax over the streams (the sigmoid gate
                       is the softmax with the second stream's logit fixed at 0); under the fused
                       LayerNorm, one exact pass for the moments of o = x + s v + r; a last pass writes
                       y. Saves the token streams' pre-activations z_j and the gate's log-sum-exp
                       (fp32), fused (operand dtype) and the row statistics (SAVED, FUSED below).
backward, 3 launches
  gmu_bwd_rows_kernel  one pass over dy, x, r: the output LayerNorm's row sums and dfused = dv W_up,
                       folded as rstd_o (g W' - mean(g) 1 W' - mean(g ohat) ohat W') (three dots per
                       chunk, none needing the row sums first); then the gate's backward on chip.
                       Writes dz_j of the token streams, the gate's dl_g and dpre_j (KGRAD, operand
                       dtype), the row scalars of the LayerNorms' backward (algebraic:
                       mean(dxhat) = dz . f1 / d_j, mean(dxhat o xhat) = dz . (z - f2) / d_j) and, per
                       tile, the sums of dz_j of the per-sample streams (ROWGRAD).
  gmu_bwd_cols_kernel  grid (units, token splits). A unit is: two 16-column chunks of one token stream
                       (dx or dm_j elementwise from the row scalars; W_j's gradient as the GEMM
                       m = dz^T xhat over the split's tokens, the LayerNorm's and the bias's gradients
                       derived from m and sum dz, so no per-column accumulator sits on chip; the text
                       stream's units also carry dr and W_up, b_up, the scaling and the output
                       LayerNorm, from fused^T do); a 16-column chunk of a per-sample stream (over all
                       B samples, split 0 only, written straight to the gradient buffer); or one
                       gate's (dl_g^T a_i) or one GMU matrix's (dpre_j^T a_j) gradient. One fp32
                       partial per split.
  reduce_partials_kernel  sums the splits in a fixed order (deterministic), in the parameters' dtype.

Launch settings (`tiles`) keep every kernel free of spills when compiled for sm_90 at BERT widths
(python -m benchmarks.compile_report --only gmu).
"""

from typing import NamedTuple, Optional

import triton
import triton.language as tl

from .common import (SCALE_FLOAT, SCALE_SCALAR, activation, activation_grad, merge_moments, reduce_partials_kernel,
                     select, walk_chunk)


class Streams(NamedTuple):
    """The S streams' inputs and parameters, each a tuple with one element per stream (j = 0 text)."""
    inputs: tuple       # x (N, D), then each modality: token-aligned (N, D_j) or per-sample (B, D_j)
    widths: tuple       # D_j (ints)
    w: tuple            # W_j (K, D_j)
    b: tuple            # c_j (K,)
    ln_w: Optional[tuple] = None  # LN_j weight and bias (D_j,), None without stream LayerNorms
    ln_b: Optional[tuple] = None


class Params(NamedTuple):
    """The parameters shared by all streams (None where the configuration has none)."""
    gate_w: object      # (SG, K, S K)
    gate_b: object      # (SG, K)
    gmu_w: object       # (S, K, K), GMU form only
    w_up: object        # (D, K)
    b_up: object        # (D,)
    scale: object       # learned scaling (1,) or (D,); None for a float scaling
    scale_value: float  # the float scaling
    ln_weight: object   # the fused output LayerNorm (D,), FUSE_LN only
    ln_bias: object


class Config(NamedTuple):
    """The kernels' static options (one tl.constexpr). Triton 3.6 reads its fields inside a kernel as plain
    Python values, not constexprs: tl.static_range takes them wrapped, tl.static_range(tl.constexpr(CFG.S))."""
    S: int              # streams: text + modalities
    SG: int             # gates: 1 (sigmoid; stream 1's logit is 0) or S (softmax)
    ALIGNED: tuple      # per stream: token-aligned (True) or per-sample
    TOK: tuple          # per stream: its slot among the token-aligned streams, -1 for per-sample ones
    PS: tuple           # per stream: its slot among the per-sample streams, -1 for token-aligned ones
    N_TOK: int
    N_PS: int
    STREAM_LN: bool     # LN_j before each stream's projection
    GMU_FORM: bool      # gate h_j = tanh(a_j V_j^T) rather than a_j
    FUSE_LN: bool       # y = LN(x + u + r) rather than x + u
    ACT: int            # kernels/codes.py ACTIVATIONS
    SCALE_MODE: int     # kernels/codes.py SCALE_MODES
    DR_GRAD: bool = False   # backward: dr wanted
    LN_GRAD: bool = False   # backward: the output LayerNorm's parameters want gradients
    MOD_GRAD: bool = False  # backward: the modalities want gradients


class GradOffsets(NamedTuple):
    """Where gradients go: token streams and shared parameters in each split's partial row (reduced
    after), per-sample streams straight into the final buffer, after the reduced part. Plain ints."""
    stream: tuple       # per stream j: offset of dW_j; dc_j, dLN_j weight, bias follow
    gate: int           # dgate_w; dgate_b, dgmu_w follow
    up: int             # dW_up; then b_up, scale, ln_weight, ln_bias at + D K + i D, i = 0..3
    reduced: int        # length of a partial row


# ----------------------------------------------------------------------------- buffer layouts
# CONSTS (fp32): s (D) | fold f1_j, f2_j (S x 2 x K) | asum = 1^T (s o W_up) (K) | per-sample pre-activations
# (B x N_PS x K) | per-sample mean, rstd (B x N_PS x 2).
# SAVED (fp32): planes of (N, K): z_j of each token stream, then the log-sum-exp of the gate logits; then
# rows of N: mean_j, rstd_j of each token stream (STREAM_LN), mean and rstd of the output LayerNorm.
# WEIGHTS (operand dtype): gate_w (SG, K, S K) then gmu_w (S, K, K), cast once per call by the prep kernel (fp32
# parameters under autocast would otherwise be loaded, and held, at twice the registers).
# FUSED (operand dtype): (N, K), the gate's output (a dot operand wherever it is read).
# KGRAD (operand dtype): planes dz_j of each token stream, dl_g of each gate's logits, dpre_j of the GMU
# form's tanh: the operands of the weight-gradient GEMMs (16 bits where the operands are).
# ROWGRAD (fp32): rows of N: mean(g), mean(g ohat) (g = dy o ln_weight), then c1_j, c2_j of each token
# stream; then (tiles, N_PS, K) per-tile sums of dz_j of the per-sample streams.


class Buffers(NamedTuple):
    """The buffers the kernels hand each other (layouts above); None where not made yet."""
    consts: object
    weights: object
    saved: object
    fused: object
    kgrad: object = None
    rowgrad: object = None


def consts_size(D, K, S, B, n_ps):
    return D + 2 * S * K + K + B * n_ps * K + 2 * B * n_ps


def saved_size(N, K, n_tok):
    return (n_tok + 1) * N * K + (2 * n_tok + 2) * N


def weights_size(K, S, SG, gmu_form):
    return SG * K * S * K + gmu_form * S * K * K


def kgrad_planes(n_tok, S, SG, gmu_form):
    return n_tok + SG + S * gmu_form


def rowgrad_size(N, K, n_tok, tiles, n_ps):
    return (2 * n_tok + 2) * N + tiles * n_ps * K


@triton.jit
def _fold(consts, D, K, j):
    """Pointer to f1_j (f2_j follows at + K)."""
    return consts + D + 2 * j * K


@triton.jit
def _asum(consts, D, K, S: tl.constexpr):
    return consts + D + 2 * S * K


@triton.jit
def _sample_z(consts, D, K, B, S: tl.constexpr):
    return _asum(consts, D, K, S) + K


@triton.jit
def _sample_stats(consts, D, K, B, S: tl.constexpr, N_PS: tl.constexpr):
    return _sample_z(consts, D, K, B, S) + B * N_PS * K


@triton.jit
def _plane(buf, p, rows, kk, N, K):
    """Pointers of rows ``rows`` of plane p of a buffer of (N, K) planes: [BLOCK_M, BLOCK_K]."""
    return buf + p * N * K + rows[:, None] * K + kk[None, :]


@triton.jit
def _plane_t(buf, p, rows, kk, N, K):
    """The transposed pointers of _plane: [BLOCK_K, BLOCK_M]."""
    return buf + p * N * K + rows[None, :] * K + kk[:, None]


@triton.jit
def _row_scalar(buf, planes, i, rows, N, K):
    """Pointers of row scalar i (after ``planes`` planes of (N, K)) at ``rows``."""
    return buf + planes * N * K + i * N + rows


# ----------------------------------------------------------------------------- shared pieces

@triton.jit
def _stream_chunk(streams, j: tl.constexpr, cols, col_mask, kk, k_mask, op, STREAM_LN: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """Columns ``cols`` of stream j: W_j's [BLOCK_K, BLOCK_D] chunk in the operand dtype, and its LayerNorm's
    weight and bias (zeros without stream LayerNorms)."""
    width = streams.widths[j]
    w = tl.load(streams.w[j] + kk[:, None] * width + cols[None, :], mask=k_mask[:, None] & col_mask[None, :],
                other=0.0).to(op.dtype)
    lam = tl.zeros([BLOCK_D], dtype=tl.float32)
    mu = lam
    if STREAM_LN:
        lam = _vec(streams.ln_w[j], cols, col_mask)
        mu = _vec(streams.ln_b[j], cols, col_mask)
    return w, lam, mu


@triton.jit
def _tile_rows(tile, T, BLOCK_M: tl.constexpr):
    """(b, rows, row_mask) of tile ``tile``: tiles run over samples, ceil(T / BLOCK_M) per sample, so a
    tile's tokens share one sample (a per-sample stream is then one broadcast row)."""
    per_sample = tl.cdiv(T, BLOCK_M)
    b = tile // per_sample
    t = (tile % per_sample) * BLOCK_M + tl.arange(0, BLOCK_M)
    return b, b.to(tl.int64) * T + t, t < T


@triton.jit
def _load_tile(ptr, rows, row_mask, cols, col_mask, width):
    """[len(rows), len(cols)] fp32 tile of a (rows, width) row-major tensor, 0 outside."""
    mask = row_mask[:, None] & col_mask[None, :]
    return tl.load(ptr + rows[:, None] * width + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_tile(ptr, value, rows, row_mask, cols, col_mask, width):
    mask = row_mask[:, None] & col_mask[None, :]
    tl.store(ptr + rows[:, None] * width + cols[None, :], value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _vec(ptr, offs, mask):
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _scale_chunk(shared, cols, col_mask, SCALE_MODE: tl.constexpr):
    """The scaling s at ``cols`` as an fp32 vector, whatever its kind."""
    if SCALE_MODE == SCALE_FLOAT:
        s = tl.where(col_mask, shared.scale_value, 0.0)
    elif SCALE_MODE == SCALE_SCALAR:
        s = tl.where(col_mask, tl.load(shared.scale).to(tl.float32), 0.0)
    else:
        s = _vec(shared.scale, cols, col_mask)
    return s


@triton.jit
def _w_up_t(shared, cols, col_mask, kk, k_mask, K):
    """W_up^T at ``cols``: [BLOCK_K, BLOCK_D] in W_up's dtype."""
    return tl.load(shared.w_up + cols[None, :] * K + kk[:, None], mask=k_mask[:, None] & col_mask[None, :], other=0.0)


@triton.jit
def _pre_activation(bufs, j: tl.constexpr, b, rows, row_mask, kk, k_mask, N, D, K, B, CFG: tl.constexpr,
                    BLOCK_M: tl.constexpr):
    """z_j of a tile, [BLOCK_M, BLOCK_K] fp32: a saved plane for a token stream, the sample's row of the
    constants for a per-sample stream (broadcast)."""
    if CFG.ALIGNED[j]:
        z = tl.load(_plane(bufs.saved, CFG.TOK[j], rows, kk, N, K), mask=row_mask[:, None] & k_mask[None, :],
                    other=0.0)
    else:
        row = _vec(_sample_z(bufs.consts, D, K, B, CFG.S), (b * CFG.N_PS + CFG.PS[j]) * K + kk, k_mask)
        z = tl.zeros([BLOCK_M, kk.shape[0]], dtype=tl.float32) + row[None, :]
    return z


@triton.jit
def _activations(bufs, b, rows, row_mask, kk, k_mask, N, D, K, B, op, CFG: tl.constexpr, BLOCK_M: tl.constexpr):
    """(a_0, ..., a_{S-1}) of a tile from the saved pre-activations, in the operand dtype (as the forward
    held them)."""
    acts = ()
    for j in tl.static_range(tl.constexpr(CFG.S)):
        z = _pre_activation(bufs, j, b, rows, row_mask, kk, k_mask, N, D, K, B, CFG, BLOCK_M)
        acts = acts + (activation(z, CFG.ACT).to(op),)
    return acts


@triton.jit
def _tuple_add(t, i: tl.constexpr, value, S: tl.constexpr):
    """t with t[i] + value in place of t[i]."""
    out = ()
    for j in tl.static_range(S):
        if j == i:
            out = out + (t[j] + value,)
        else:
            out = out + (t[j],)
    return out


@triton.jit
def _gate_block(gate_w, g, i, kk, k_mask, K, S: tl.constexpr):
    """G_{g,i} = gate_w[g, :, i K:(i+1) K]: [BLOCK_K (gate feature r), BLOCK_K (stream i's feature c)]."""
    offs = g * K * S * K + kk[:, None] * (S * K) + i * K + kk[None, :]
    return tl.load(gate_w + offs, mask=k_mask[:, None] & k_mask[None, :], other=0.0)


@triton.jit
def _gmu_block(gmu_w, j, kk, k_mask, K):
    """V_j = gmu_w[j]: [BLOCK_K (r), BLOCK_K (c)]."""
    offs = j * K * K + kk[:, None] * K + kk[None, :]
    return tl.load(gmu_w + offs, mask=k_mask[:, None] & k_mask[None, :], other=0.0)


@triton.jit
def _logit(acts, shared, weights, j, kk, k_mask, K, CFG: tl.constexpr, PRECISION: tl.constexpr):
    """Gate logits of stream j (a constexpr or a loop index): sum_i a_i G_{j,i}^T + g_j; 0 for the sigmoid
    gate's second stream. ``acts``: the S activation tiles, ``weights``: WEIGHTS, both in the operand dtype."""
    l = tl.zeros(acts[0].shape, dtype=tl.float32)
    if j < CFG.SG:
        for i in tl.static_range(tl.constexpr(CFG.S)):
            g = _gate_block(weights, j, i, kk, k_mask, K, CFG.S)
            l = tl.dot(acts[i], tl.trans(g), acc=l, input_precision=PRECISION)
        l += _vec(shared.gate_b, j * K + kk, k_mask)[None, :]
    return l


@triton.jit
def _gated(a, weights, j, kk, k_mask, K, CFG: tl.constexpr, PRECISION: tl.constexpr):
    """h_j, fp32: a_j (direct form) or tanh(a_j V_j^T) (GMU form); ``a`` in the operand dtype."""
    if CFG.GMU_FORM:
        v = _gmu_block(weights + CFG.SG * K * CFG.S * K, j, kk, k_mask, K)
        h = 2.0 * tl.sigmoid(2.0 * tl.dot(a, tl.trans(v), input_precision=PRECISION)) - 1.0
    else:
        h = a.to(tl.float32)
    return h


@triton.jit
def _operand(x_ptr, r_ptr, FUSE_LN: tl.constexpr):
    """A zero-size proxy for the tensor-core operand dtype: the 16-bit one of x and r (autocast hands the
    op a 16-bit x and an fp32 r), else fp32. Returned as a 0.0 of that dtype (a dtype cannot be)."""
    if x_ptr.dtype.element_ty == tl.float32:
        if FUSE_LN:
            z = tl.zeros([1], dtype=r_ptr.dtype.element_ty)
        else:
            z = tl.zeros([1], dtype=tl.float32)
    else:
        z = tl.zeros([1], dtype=x_ptr.dtype.element_ty)
    return z


# ----------------------------------------------------------------------------- forward

@triton.jit
def _fold_vectors(streams, j: tl.constexpr, consts, D, K, kk, k_mask, STREAM_LN: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """f1_j = W_j gamma_j and f2_j = W_j beta_j + c_j (f1 = 0, f2 = c_j without stream LayerNorms)."""
    width = streams.widths[j]
    f1 = tl.zeros([kk.shape[0]], dtype=tl.float32)
    f2 = _vec(streams.b[j], kk, k_mask)
    if STREAM_LN:
        for c0 in range(0, width, BLOCK_D):
            cols = c0 + tl.arange(0, BLOCK_D)
            col_mask = cols < width
            w = _load_tile(streams.w[j], kk, k_mask, cols, col_mask, width)
            f1 += tl.sum(w * _vec(streams.ln_w[j], cols, col_mask)[None, :], axis=1)
            f2 += tl.sum(w * _vec(streams.ln_b[j], cols, col_mask)[None, :], axis=1)
    tl.store(_fold(consts, D, K, j) + kk, f1, mask=k_mask)
    tl.store(_fold(consts, D, K, j) + K + kk, f2, mask=k_mask)


@triton.jit
def _sample_projections(streams, consts, tile, B, D, K, kk, k_mask, eps, op, CFG: tl.constexpr,
                        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pre-activations z_j = LN_j(m_j) W_j^T + c_j of every per-sample stream for BLOCK_M samples, with the
    LayerNorm's statistics (B rows in all, once per call): one pass over each row, as the token streams',
    the fold vectors taken in the same pass (the prep kernel's fold programs write them in this launch)."""
    samples = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    smask = samples < B
    for j in tl.static_range(tl.constexpr(CFG.S)):
        if not CFG.ALIGNED[j]:
            z, mean, rstd = _stream_pass(streams, j, consts, samples, smask, kk, k_mask, K, eps, op, CFG, PRECISION,
                                         BLOCK_D, OWN_FOLD=True)
            slot = samples[:, None] * CFG.N_PS + CFG.PS[j]
            tl.store(_sample_z(consts, D, K, B, CFG.S) + slot * K + kk[None, :], z,
                     mask=smask[:, None] & k_mask[None, :])
            stats = _sample_stats(consts, D, K, B, CFG.S, CFG.N_PS) + (samples * CFG.N_PS + CFG.PS[j]) * 2
            tl.store(stats, mean, mask=smask)
            tl.store(stats + 1, rstd, mask=smask)


@triton.jit
def gmu_prep_kernel(
    streams,                # Streams
    shared,                 # Params (never named `params`: Triton's launcher binds arguments in a generated
                            # function whose local `params` would replace it; compile_report caught it)
    consts,                 # out: the CONSTS buffer
    weights,                # out: the WEIGHTS buffer
    B, K,
    eps,                    # the stream LayerNorms'
    CFG: tl.constexpr,      # Config
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,  # samples per per-sample program
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # programs: S fold programs (the first also writes s and asum), then cdiv(B, BLOCK_M) per-sample programs
    # when there are per-sample streams
    pid = tl.program_id(0)
    D = streams.widths[0]
    kk = tl.arange(0, BLOCK_K)
    k_mask = kk < K
    op = tl.zeros([1], dtype=weights.dtype.element_ty)  # (the operand dtype: see _operand)
    for j in tl.static_range(tl.constexpr(CFG.S)):
        if pid == j:
            _fold_vectors(streams, j, consts, D, K, kk, k_mask, CFG.STREAM_LN, BLOCK_D)
    mask = k_mask[:, None] & k_mask[None, :]
    if pid < CFG.SG:  # gate pid's weights, in the operand dtype
        for i in tl.static_range(tl.constexpr(CFG.S)):
            offs = pid * K * CFG.S * K + kk[:, None] * (CFG.S * K) + i * K + kk[None, :]
            tl.store(weights + offs, _gate_block(shared.gate_w, pid, i, kk, k_mask, K, CFG.S).to(op.dtype),
                     mask=mask)
    if CFG.GMU_FORM:
        if pid < CFG.S:
            offs = CFG.SG * K * CFG.S * K + pid * K * K + kk[:, None] * K + kk[None, :]
            tl.store(weights + offs, _gmu_block(shared.gmu_w, pid, kk, k_mask, K).to(op.dtype), mask=mask)
    if pid == 0:
        asum = tl.zeros([BLOCK_K], dtype=tl.float32)
        for c0 in range(0, D, BLOCK_D):
            cols = c0 + tl.arange(0, BLOCK_D)
            col_mask = cols < D
            sc = _scale_chunk(shared, cols, col_mask, CFG.SCALE_MODE)
            w_up = _load_tile(shared.w_up, cols, col_mask, kk, k_mask, K)  # before the store: a round trip a step
            tl.store(consts + cols, sc, mask=col_mask)
            asum += tl.sum(w_up * sc[:, None], axis=0)
        tl.store(_asum(consts, D, K, CFG.S) + kk, asum, mask=k_mask)
    if CFG.N_PS > 0:
        if (pid >= CFG.S) & (pid < CFG.S + tl.cdiv(B, BLOCK_M)):
            _sample_projections(streams, consts, pid - CFG.S, B, D, K, kk, k_mask, eps, op, CFG, PRECISION, BLOCK_M,
                                BLOCK_D)


@triton.jit
def _stream_pass(streams, j: tl.constexpr, consts, rows, row_mask, kk, k_mask, K, eps, op, CFG: tl.constexpr,
                 PRECISION: tl.constexpr, BLOCK_D: tl.constexpr, OWN_FOLD: tl.constexpr = False):
    """One pass over stream j's input rows: (z_j, mean_j, rstd_j). The moments are sums of x - shift and its
    square, with the shift the row's first-chunk mean: a row's large common offset is gone before anything is
    squared, and the same shift keeps it out of the 16-bit dot operand. The fold vectors W_j gamma_j and
    W_j beta_j + c_j come from the constants, or (OWN_FOLD: the prep kernel's per-sample streams) from the
    same pass. Each step loads before it computes (docs/design.md, rule 8)."""
    width = streams.widths[j]
    x_ptr = streams.inputs[j]
    zero = tl.where(row_mask, 0.0, 0.0)
    cols = tl.arange(0, BLOCK_D)
    shift = zero
    if CFG.STREAM_LN:
        shift = tl.sum(_load_tile(x_ptr, rows, row_mask, cols, cols < width, width), axis=1) / tl.minimum(width,
                                                                                                         BLOCK_D)
    acc = tl.zeros([rows.shape[0], kk.shape[0]], dtype=tl.float32)
    f1 = tl.zeros([kk.shape[0]], dtype=tl.float32)
    f2 = f1
    s1, s2 = zero, zero
    for c0 in range(0, width, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        col_mask = cols < width
        if CFG.STREAM_LN:
            ln_w = _vec(streams.ln_w[j], cols, col_mask)
            ln_b = _vec(streams.ln_b[j], cols, col_mask) if OWN_FOLD else ln_w
        x = _load_tile(x_ptr, rows, row_mask, cols, col_mask, width)
        w = tl.load(streams.w[j] + kk[:, None] * width + cols[None, :], mask=k_mask[:, None] & col_mask[None, :],
                    other=0.0)
        if CFG.STREAM_LN:  # the LayerNorm's weight joins the activation side: W_j stays exact in 16 bits
            if OWN_FOLD:  # _fold_vectors' sums, here in the same pass (a latency-bound kernel)
                f1 += tl.sum(w.to(tl.float32) * ln_w[None, :], axis=1)
                f2 += tl.sum(w.to(tl.float32) * ln_b[None, :], axis=1)
            xc = tl.where(col_mask[None, :], x - shift[:, None], 0.0)
            s1 += tl.sum(xc, axis=1)
            s2 += tl.sum(xc * xc, axis=1)
            xs = xc * ln_w[None, :]
        else:
            xs = x
        acc = tl.dot(xs.to(op.dtype), tl.trans(w.to(op.dtype)), acc=acc, input_precision=PRECISION)
    if OWN_FOLD:
        f2 += _vec(streams.b[j], kk, k_mask)
    else:
        fold = _fold(consts, streams.widths[0], K, j)
        f1 = _vec(fold, kk, k_mask)
        f2 = _vec(fold + K, kk, k_mask)
    mean = shift + s1 / width
    rstd = zero
    if CFG.STREAM_LN:
        rstd = 1.0 / tl.sqrt(tl.maximum(s2 - s1 * s1 / width, 0.0) / width + eps)
        z = rstd[:, None] * (acc + (shift - mean)[:, None] * f1[None, :]) + f2[None, :]
    else:
        z = acc + f2[None, :]
    return z, mean, rstd


@triton.jit
def _output_chunk(x_ptr, r_ptr, shared, consts, fused_op, rows, row_mask, cols, col_mask, kk, k_mask, D, K,
                  FUSE_LN: tl.constexpr, PRECISION: tl.constexpr):
    """o = x + s v (+ r under FUSE_LN) of one chunk, fp32, with v = fused W_up^T + b_up."""
    v = tl.dot(fused_op, _w_up_t(shared, cols, col_mask, kk, k_mask, K).to(fused_op.dtype), input_precision=PRECISION)
    v += _vec(shared.b_up, cols, col_mask)[None, :]
    o = _load_tile(x_ptr, rows, row_mask, cols, col_mask, D) + v * _vec(consts, cols, col_mask)[None, :]
    if FUSE_LN:
        o += _load_tile(r_ptr, rows, row_mask, cols, col_mask, D)
    return o


@triton.jit
def _gate_forward(acts, shared, weights, kk, k_mask, K, CFG: tl.constexpr, PRECISION: tl.constexpr):
    """(fused, lse): fused = sum_j softmax_j(l) h_j by an online softmax over the streams (no S logit tiles
    held at once), lse the log-sum-exp of the logits (backward recomputes each softmax weight from it)."""
    m = tl.full(acts[0].shape, float("-inf"), dtype=tl.float32)
    den = tl.zeros(acts[0].shape, dtype=tl.float32)
    num = tl.zeros(acts[0].shape, dtype=tl.float32)
    # a runtime loop over the streams: unrolled, every stream's weight blocks would be loaded up front and held in
    # registers at once (the backward's gate loop is one for the same reason)
    for j in range(0, CFG.S):
        l = _logit(acts, shared, weights, j, kk, k_mask, K, CFG, PRECISION)
        h = _gated(select(acts, j, CFG.S), weights, j, kk, k_mask, K, CFG, PRECISION)
        m_new = tl.maximum(m, l)
        alpha = tl.exp(m - m_new)
        p = tl.exp(l - m_new)
        den = den * alpha + p
        num = num * alpha + p * h
        m = m_new
    return num / den, m + tl.log(den)


@triton.jit
def gmu_fwd_kernel(
    streams,                # Streams
    shared,                 # Params
    r_ptr,                  # (N, D) residual, read when FUSE_LN (dtype may differ from x's: autocast)
    y_ptr,                  # out (N, D): x's dtype, or that of x + r under FUSE_LN
    bufs,                   # Buffers: consts (gmu_prep_kernel's); out when SAVE: saved, fused
    B, T, K,
    eps,                    # the stream LayerNorms'
    ln_eps,                 # the output LayerNorm's
    CFG: tl.constexpr,      # Config
    SAVE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    b, rows, row_mask = _tile_rows(tl.program_id(0), T, BLOCK_M)
    N = B * T
    D = streams.widths[0]
    x_ptr = streams.inputs[0]
    kk = tl.arange(0, BLOCK_K)
    k_mask = kk < K
    tile_mask = row_mask[:, None] & k_mask[None, :]
    op = _operand(x_ptr, r_ptr, CFG.FUSE_LN)
    consts, saved = bufs.consts, bufs.saved
    NP: tl.constexpr = CFG.N_TOK + 1  # planes of SAVED

    # ---- streams ----
    acts = ()
    for j in tl.static_range(tl.constexpr(CFG.S)):
        if CFG.ALIGNED[j]:
            z, mean_j, rstd_j = _stream_pass(streams, j, consts, rows, row_mask, kk, k_mask, K, eps, op, CFG,
                                             PRECISION, BLOCK_D)
            if SAVE:
                tl.store(_plane(saved, CFG.TOK[j], rows, kk, N, K), z, mask=tile_mask)
                if CFG.STREAM_LN:
                    tl.store(_row_scalar(saved, NP, 2 * CFG.TOK[j], rows, N, K), mean_j, mask=row_mask)
                    tl.store(_row_scalar(saved, NP, 2 * CFG.TOK[j] + 1, rows, N, K), rstd_j, mask=row_mask)
        else:
            z = _pre_activation(bufs, j, b, rows, row_mask, kk, k_mask, N, D, K, B, CFG, BLOCK_M)
        acts = acts + (activation(z, CFG.ACT).to(op.dtype),)

    # ---- gate, on chip ----
    fused, lse = _gate_forward(acts, shared, bufs.weights, kk, k_mask, K, CFG, PRECISION)
    fused_op = fused.to(op.dtype)
    if SAVE:
        tl.store(_plane(bufs.fused, 0, rows, kk, N, K), fused_op, mask=tile_mask)
        tl.store(_plane(saved, CFG.N_TOK, rows, kk, N, K), lse, mask=tile_mask)

    # ---- the output LayerNorm's moments: one exact pass over o = x + s v + r (x and r again, from L2). The
    # adapter block gets them algebraically from a Gram matrix of s o W_up during its first pass; here that
    # pass's extra state, held through the gate, spilled on Hopper.
    mean_o = tl.where(row_mask, 0.0, 0.0)
    rstd_o = mean_o
    if CFG.FUSE_LN:
        m2 = mean_o
        for i in range(0, tl.cdiv(D, BLOCK_D)):  # from the last chunk, which the text stream's pass read last
            c0, before = walk_chunk(i, D, True, BLOCK_D)
            cols = c0 + tl.arange(0, BLOCK_D)
            col_mask = cols < D
            o = _output_chunk(x_ptr, r_ptr, shared, consts, fused_op, rows, row_mask, cols, col_mask, kk, k_mask,
                                  D, K, CFG.FUSE_LN, PRECISION)
            mean_o, m2 = merge_moments(mean_o, m2, o, col_mask, before, D)
        rstd_o = 1.0 / tl.sqrt(m2 / D + ln_eps)
        if SAVE:
            tl.store(_row_scalar(saved, NP, 2 * CFG.N_TOK, rows, N, K), mean_o, mask=row_mask)
            tl.store(_row_scalar(saved, NP, 2 * CFG.N_TOK + 1, rows, N, K), rstd_o, mask=row_mask)

    # ---- out: y = x + s (fused W_up^T + b_up), LayerNormed with r under FUSE_LN; the walk starts on the
    # chunk where the pass before ended (walk_chunk) ----
    for i in range(0, tl.cdiv(D, BLOCK_D)):
        c0, _before = walk_chunk(i, D, not CFG.FUSE_LN, BLOCK_D)
        cols = c0 + tl.arange(0, BLOCK_D)
        col_mask = cols < D
        o = _output_chunk(x_ptr, r_ptr, shared, consts, fused_op, rows, row_mask, cols, col_mask, kk, k_mask, D,
                              K, CFG.FUSE_LN, PRECISION)
        if CFG.FUSE_LN:
            o = (o - mean_o[:, None]) * rstd_o[:, None] * _vec(shared.ln_weight, cols, col_mask)[None, :] \
                + _vec(shared.ln_bias, cols, col_mask)[None, :]
        _store_tile(y_ptr, o, rows, row_mask, cols, col_mask, D)


# ----------------------------------------------------------------------------- backward

@triton.jit
def gmu_bwd_rows_kernel(
    streams,                # Streams
    shared,                 # Params
    dy_ptr,                 # (N, D)
    r_ptr,                  # (N, D), read when FUSE_LN
    bufs,                   # Buffers: the forward's consts, saved, fused; out: kgrad, rowgrad
    B, T, K,
    CFG: tl.constexpr,      # Config
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0)
    b, rows, row_mask = _tile_rows(tile, T, BLOCK_M)
    N = B * T
    D = streams.widths[0]
    x_ptr = streams.inputs[0]
    kk = tl.arange(0, BLOCK_K)
    k_mask = kk < K
    tile_mask = row_mask[:, None] & k_mask[None, :]
    op = _operand(x_ptr, r_ptr, CFG.FUSE_LN)
    consts, saved, kgrad, rowgrad = bufs.consts, bufs.saved, bufs.kgrad, bufs.rowgrad
    NP: tl.constexpr = CFG.N_TOK + 1
    fused_op = tl.load(_plane(bufs.fused, 0, rows, kk, N, K), mask=tile_mask, other=0.0)

    # ---- dfused = dv W_up = sum_c do_c W'[c, :] (W' = s o W_up). Under FUSE_LN, with g = dy o ln_weight and
    # the forward's mean_o, rstd_o: do = rstd_o (g - mean(g) - ohat mean(g ohat)), so
    #   dfused = rstd_o (g W' - mean(g) 1 W' - mean(g ohat) ohat W'): three dots per chunk, none needing the
    # row sums first (1 W' is asum, a constant).
    xg = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    xo = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    sum_g = tl.where(row_mask, 0.0, 0.0)
    sum_go = sum_g
    mean_o = sum_g
    rstd_o = sum_g
    if CFG.FUSE_LN:
        mean_o = tl.load(_row_scalar(saved, NP, 2 * CFG.N_TOK, rows, N, K), mask=row_mask, other=0.0)
        rstd_o = tl.load(_row_scalar(saved, NP, 2 * CFG.N_TOK + 1, rows, N, K), mask=row_mask, other=0.0)
    for c0 in range(0, D, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        col_mask = cols < D
        s = _vec(consts, cols, col_mask)
        wut = _w_up_t(shared, cols, col_mask, kk, k_mask, K).to(op.dtype)  # W_up^T, loaded once for both uses
        wp = tl.trans(wut.to(tl.float32) * s[None, :]).to(op.dtype)
        g = _load_tile(dy_ptr, rows, row_mask, cols, col_mask, D)
        if CFG.FUSE_LN:
            v = tl.dot(fused_op, wut, input_precision=PRECISION) + _vec(shared.b_up, cols, col_mask)[None, :]
            o = _load_tile(x_ptr, rows, row_mask, cols, col_mask, D) + v * s[None, :] \
                + _load_tile(r_ptr, rows, row_mask, cols, col_mask, D)
            ohat = tl.where(col_mask[None, :], (o - mean_o[:, None]) * rstd_o[:, None], 0.0)
            g = g * _vec(shared.ln_weight, cols, col_mask)[None, :]
            sum_g += tl.sum(g, axis=1)
            sum_go += tl.sum(g * ohat, axis=1)
            xo = tl.dot(ohat.to(op.dtype), wp, acc=xo, input_precision=PRECISION)
        xg = tl.dot(g.to(op.dtype), wp, acc=xg, input_precision=PRECISION)
    if CFG.FUSE_LN:
        mg = sum_g / D
        mgo = sum_go / D
        asum = _vec(_asum(consts, D, K, CFG.S), kk, k_mask)
        dfused = rstd_o[:, None] * (xg - mg[:, None] * asum[None, :] - mgo[:, None] * xo)
        tl.store(_row_scalar(rowgrad, 0, 0, rows, N, K), mg, mask=row_mask)
        tl.store(_row_scalar(rowgrad, 0, 1, rows, N, K), mgo, mask=row_mask)
    else:
        dfused = xg
    dfused = tl.where(tile_mask, dfused, 0.0)

    # ---- the gate, on chip: with z_j = exp(l_j - lse), fused = sum_j z_j h_j,
    #   dh_j = dfused z_j,  dl_j = z_j dfused (h_j - fused),  da_i = sum_j dl_j G_{j,i} + (dh_i or, GMU form,
    #   dpre_i V_i with dpre_i = dh_i (1 - h_i^2)). dl_j and dpre_j go to KGRAD for the gate's weight gradients.
    acts = _activations(bufs, b, rows, row_mask, kk, k_mask, N, D, K, B, op.dtype, CFG, BLOCK_M)
    lse = tl.load(_plane(saved, CFG.N_TOK, rows, kk, N, K), mask=tile_mask, other=0.0)
    fused = fused_op.to(tl.float32)
    das = ()
    for j in tl.static_range(tl.constexpr(CFG.S)):
        das = das + (tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32),)
    for j in range(0, CFG.S):
        l = _logit(acts, shared, bufs.weights, j, kk, k_mask, K, CFG, PRECISION)
        h = _gated(select(acts, j, CFG.S), bufs.weights, j, kk, k_mask, K, CFG, PRECISION)
        dh = dfused * tl.where(tile_mask, tl.exp(l - lse), 0.0)
        if CFG.GMU_FORM:
            dpre = (dh * (1.0 - h * h)).to(op.dtype)
            tl.store(_plane(kgrad, CFG.N_TOK + CFG.SG + j, rows, kk, N, K), dpre, mask=tile_mask)
            dd = tl.dot(dpre, _gmu_block(bufs.weights + CFG.SG * K * CFG.S * K, j, kk, k_mask, K),
                        input_precision=PRECISION)
        else:
            dd = dh
        dl = (dh * (h - fused)).to(op.dtype)
        if j < CFG.SG:
            tl.store(_plane(kgrad, CFG.N_TOK + j, rows, kk, N, K), dl, mask=tile_mask)
        out = ()
        for i in tl.static_range(tl.constexpr(CFG.S)):
            da = das[i] + tl.where(j == i, dd, 0.0)
            if j < CFG.SG:
                da = tl.dot(dl, _gate_block(bufs.weights, j, i, kk, k_mask, K, CFG.S), acc=da,
                            input_precision=PRECISION)
            out = out + (da,)
        das = out

    # ---- dz_j, and the LayerNorm row scalars: for LN_j right before W_j, with dxn = dz W_j and
    # z - f2 = (gamma o xhat) W_j^T: mean(dxn o gamma) = dz . f1 / D_j, mean(dxn o gamma o xhat) = dz . (z - f2) / D_j
    for j in tl.static_range(tl.constexpr(CFG.S)):
        z = _pre_activation(bufs, j, b, rows, row_mask, kk, k_mask, N, D, K, B, CFG, BLOCK_M)
        dz = tl.where(tile_mask, das[j] * activation_grad(z, CFG.ACT), 0.0)
        if CFG.ALIGNED[j]:
            tl.store(_plane(kgrad, CFG.TOK[j], rows, kk, N, K), dz.to(kgrad.dtype.element_ty), mask=tile_mask)
            if CFG.STREAM_LN:
                fold = _fold(consts, D, K, j)
                width = streams.widths[j]
                c1 = tl.sum(dz * _vec(fold, kk, k_mask)[None, :], axis=1) / width
                c2 = tl.sum(dz * (z - _vec(fold + K, kk, k_mask)[None, :]), axis=1) / width
                tl.store(_row_scalar(rowgrad, 0, 2 + 2 * CFG.TOK[j], rows, N, K), c1, mask=row_mask)
                tl.store(_row_scalar(rowgrad, 0, 3 + 2 * CFG.TOK[j], rows, N, K), c2, mask=row_mask)
        else:  # a per-sample stream: this tile's share of its sample's dz
            part = _row_scalar(rowgrad, 0, 2 + 2 * CFG.N_TOK, 0, N, K) + (tile * CFG.N_PS + CFG.PS[j]) * K
            tl.store(part + kk, tl.sum(dz, axis=0), mask=k_mask)


@triton.jit
def _stream_input_grad(dz_op, x, w_op, lam, mean, rstd, c1, c2, col_mask, STREAM_LN: tl.constexpr,
                       PRECISION: tl.constexpr):
    """One chunk of a stream's backward below its projection, exact from the row scalars: (d input, xhat)."""
    dxn = tl.dot(dz_op, w_op, input_precision=PRECISION)
    if STREAM_LN:
        xhat = tl.where(col_mask[None, :], (x - mean[:, None]) * rstd[:, None], 0.0)
        dx = tl.where(col_mask[None, :], (dxn * lam[None, :] - c1[:, None] - xhat * c2[:, None]) * rstd[:, None], 0.0)
    else:
        xhat = x
        dx = dxn
    return dx, xhat


@triton.jit
def _store_stream_grads(dst, off, width, chunk, cols, col_mask, kk, k_mask, K, m, acc_c, w, lam, mu,
                        STREAM_LN: tl.constexpr):
    """A stream's gradients for one column chunk at dst + off, from the two sums over tokens the units keep:
    m = dz^T xhat ([BLOCK_K, BLOCK_D]; xhat the normalised input, or the input without LN_j) and
    acc_c = sum dz. With xn = xhat o lam + mu and dxn = dz W (w: W_j's chunk):
        dW_j = m o lam + acc_c mu^T,   dc_j = acc_c,   dlam = sum_k W o m,   dmu = acc_c W
    (the per-column sums come out of the GEMM: no per-column accumulators on chip, which spilled)."""
    base = dst + off
    dw = m
    if STREAM_LN:
        dw = m * lam[None, :] + acc_c[:, None] * mu[None, :]
    tl.store(base + kk[:, None] * width + cols[None, :], dw.to(dst.dtype.element_ty),
             mask=k_mask[:, None] & col_mask[None, :])
    if chunk == 0:
        tl.store(base + K * width + kk, acc_c.to(dst.dtype.element_ty), mask=k_mask)
    if STREAM_LN:
        w = w.to(tl.float32)
        tl.store(base + K * width + K + cols, tl.sum(w * m, axis=0).to(dst.dtype.element_ty), mask=col_mask)
        tl.store(base + K * width + K + width + cols, tl.sum(w * acc_c[:, None], axis=0).to(dst.dtype.element_ty),
                 mask=col_mask)


@triton.jit
def _token_stream_unit(streams, shared, j: tl.constexpr, unit, split, dy_ptr, r_ptr, grads, bufs, part, offsets, B,
                       T, K, tiles_per_split, op, CFG: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, CHUNKS: tl.constexpr):
    """Columns of ``unit`` (CHUNKS chunks of BLOCK_D) of token stream j over the split's tiles: d input, the
    stream's weight gradients as GEMMs over tokens; for the text stream also dr, W_up, b_up, the scaling and the
    output LayerNorm. A tile's k-wide operands are loaded once for the unit's chunks, and each chunk is narrow
    (a wide one held too much at once and spilled)."""
    N = B * T
    D = streams.widths[0]
    width = streams.widths[j]
    kk = tl.arange(0, BLOCK_K)
    k_mask = kk < K
    NP: tl.constexpr = CFG.N_TOK + 1
    col0 = unit * (CHUNKS * BLOCK_D)
    ms = ()       # per chunk: dz^T xhat
    acc_dos = ()  # per chunk: fused^T do (text stream)
    sum_dos = ()  # per chunk: sum do
    acc_lnw = ()  # per chunk: the output LayerNorm's sums (LN_GRAD)
    acc_lnb = ()
    for c in tl.static_range(CHUNKS):
        ms = ms + (tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32),)
        acc_dos = acc_dos + (tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32),)
        sum_dos = sum_dos + (tl.zeros([BLOCK_D], dtype=tl.float32),)
        acc_lnw = acc_lnw + (tl.zeros([BLOCK_D], dtype=tl.float32),)
        acc_lnb = acc_lnb + (tl.zeros([BLOCK_D], dtype=tl.float32),)
    acc_c = tl.zeros([BLOCK_K], dtype=tl.float32)            # sum dz
    first = split * tiles_per_split
    for tile in range(first, tl.minimum(first + tiles_per_split, B * tl.cdiv(T, BLOCK_M))):
        b, rows, row_mask = _tile_rows(tile, T, BLOCK_M)
        tile_mask = row_mask[:, None] & k_mask[None, :]
        dz_op = tl.load(_plane(bufs.kgrad, CFG.TOK[j], rows, kk, N, K), mask=tile_mask, other=0.0).to(op.dtype)
        acc_c += tl.sum(dz_op.to(tl.float32), axis=0)
        zero = tl.where(row_mask, 0.0, 0.0)
        mean, rstd, c1, c2 = zero, zero, zero, zero
        if CFG.STREAM_LN:
            mean = tl.load(_row_scalar(bufs.saved, NP, 2 * CFG.TOK[j], rows, N, K), mask=row_mask, other=0.0)
            rstd = tl.load(_row_scalar(bufs.saved, NP, 2 * CFG.TOK[j] + 1, rows, N, K), mask=row_mask, other=0.0)
            c1 = tl.load(_row_scalar(bufs.rowgrad, 0, 2 + 2 * CFG.TOK[j], rows, N, K), mask=row_mask, other=0.0)
            c2 = tl.load(_row_scalar(bufs.rowgrad, 0, 3 + 2 * CFG.TOK[j], rows, N, K), mask=row_mask, other=0.0)
        mean_o, rstd_o, mg, mgo = zero, zero, zero, zero
        if j == 0:
            fused_op = tl.load(_plane(bufs.fused, 0, rows, kk, N, K), mask=tile_mask, other=0.0).to(op.dtype)
            if CFG.FUSE_LN:
                mean_o = tl.load(_row_scalar(bufs.saved, NP, 2 * CFG.N_TOK, rows, N, K), mask=row_mask, other=0.0)
                rstd_o = tl.load(_row_scalar(bufs.saved, NP, 2 * CFG.N_TOK + 1, rows, N, K), mask=row_mask,
                                 other=0.0)
                mg = tl.load(_row_scalar(bufs.rowgrad, 0, 0, rows, N, K), mask=row_mask, other=0.0)
                mgo = tl.load(_row_scalar(bufs.rowgrad, 0, 1, rows, N, K), mask=row_mask, other=0.0)
        next_ms, next_dos, next_sums, next_lnw, next_lnb = (), (), (), (), ()
        for c in tl.static_range(CHUNKS):
            cols = col0 + c * BLOCK_D + tl.arange(0, BLOCK_D)
            col_mask = cols < width
            w_op, lam, _mu = _stream_chunk(streams, j, cols, col_mask, kk, k_mask, op, CFG.STREAM_LN, BLOCK_D)
            x = _load_tile(streams.inputs[j], rows, row_mask, cols, col_mask, width)
            dx, xhat = _stream_input_grad(dz_op, x, w_op, lam, mean, rstd, c1, c2, col_mask, CFG.STREAM_LN,
                                          PRECISION)
            next_ms = next_ms + (tl.dot(tl.trans(dz_op), xhat.to(op.dtype), acc=ms[c], input_precision=PRECISION),)
            if j == 0:
                # ---- the output: o = x + s v (+ r), v = fused W_up^T + b_up ----
                dy = _load_tile(dy_ptr, rows, row_mask, cols, col_mask, D)
                lnw = acc_lnw[c]
                lnb = acc_lnb[c]
                if CFG.FUSE_LN:
                    v = tl.dot(fused_op, _w_up_t(shared, cols, col_mask, kk, k_mask, K).to(op.dtype),
                               input_precision=PRECISION) + _vec(shared.b_up, cols, col_mask)[None, :]
                    o = x + v * _vec(bufs.consts, cols, col_mask)[None, :] \
                        + _load_tile(r_ptr, rows, row_mask, cols, col_mask, D)
                    ohat = tl.where(col_mask[None, :], (o - mean_o[:, None]) * rstd_o[:, None], 0.0)
                    g = dy * _vec(shared.ln_weight, cols, col_mask)[None, :]
                    do = tl.where(col_mask[None, :], (g - mg[:, None] - ohat * mgo[:, None]) * rstd_o[:, None], 0.0)
                    if CFG.LN_GRAD:
                        lnw += tl.sum(dy * ohat, axis=0)
                        lnb += tl.sum(dy, axis=0)
                    if CFG.DR_GRAD:
                        _store_tile(grads.dr, do, rows, row_mask, cols, col_mask, D)
                else:
                    do = dy
                next_sums = next_sums + (sum_dos[c] + tl.sum(do, axis=0),)
                next_dos = next_dos + (tl.dot(tl.trans(fused_op), do.to(op.dtype), acc=acc_dos[c],
                                              input_precision=PRECISION),)
                next_lnw = next_lnw + (lnw,)
                next_lnb = next_lnb + (lnb,)
                _store_tile(grads.dx, dx + do, rows, row_mask, cols, col_mask, D)
            else:
                next_sums = next_sums + (sum_dos[c],)
                next_dos = next_dos + (acc_dos[c],)
                next_lnw = next_lnw + (acc_lnw[c],)
                next_lnb = next_lnb + (acc_lnb[c],)
                if CFG.MOD_GRAD:
                    _store_tile(grads.dm[j], dx, rows, row_mask, cols, col_mask, width)
        ms, acc_dos, sum_dos, acc_lnw, acc_lnb = next_ms, next_dos, next_sums, next_lnw, next_lnb

    row = part + split.to(tl.int64) * offsets.reduced
    for c in tl.static_range(CHUNKS):
        cols = col0 + c * BLOCK_D + tl.arange(0, BLOCK_D)
        col_mask = cols < width
        w, lam, mu = _stream_chunk(streams, j, cols, col_mask, kk, k_mask, op, CFG.STREAM_LN, BLOCK_D)
        _store_stream_grads(row, offsets.stream[j], width, unit * CHUNKS + c, cols, col_mask, kk, k_mask, K, ms[c],
                            acc_c, w, lam, mu, CFG.STREAM_LN)
        if j == 0:
            # with v = fused W_up^T + b_up: dW_up = s o (fused^T do)^T, db_up = s o sum do,
            # ds = sum_t do o v = sum_k W_up o (fused^T do)^T + b_up o sum do
            up = row + offsets.up
            s = _vec(bufs.consts, cols, col_mask)
            wu = _w_up_t(shared, cols, col_mask, kk, k_mask, K).to(tl.float32)  # [BLOCK_K, BLOCK_D]
            tl.store(up + cols[None, :] * K + kk[:, None], acc_dos[c] * s[None, :],
                     mask=k_mask[:, None] & col_mask[None, :])
            tl.store(up + D * K + cols, sum_dos[c] * s, mask=col_mask)
            if CFG.SCALE_MODE != SCALE_FLOAT:  # per channel; a learned scalar sums them afterwards
                ds = tl.sum(wu * acc_dos[c], axis=0) + _vec(shared.b_up, cols, col_mask) * sum_dos[c]
                tl.store(up + D * K + D + cols, ds, mask=col_mask)
            if CFG.LN_GRAD:
                tl.store(up + D * K + 2 * D + cols, acc_lnw[c], mask=col_mask)
                tl.store(up + D * K + 3 * D + cols, acc_lnb[c], mask=col_mask)


@triton.jit
def _sample_stream_unit(streams, j: tl.constexpr, chunk, grads, bufs, flat, offsets, B, T, K, row_tiles_per_sample,
                        op, CFG: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    """Columns ``chunk`` of per-sample stream j over all B samples: dz per sample is the fixed-order sum of
    the row kernel's per-tile sums; d m_j and the stream's weight gradients go straight to their outputs."""
    N = B * T
    D = streams.widths[0]
    width = streams.widths[j]
    cols = chunk * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < width
    kk = tl.arange(0, BLOCK_K)
    k_mask = kk < K
    w_op, lam, mu = _stream_chunk(streams, j, cols, col_mask, kk, k_mask, op, CFG.STREAM_LN, BLOCK_D)
    fold = _fold(bufs.consts, D, K, j)
    f1 = _vec(fold, kk, k_mask)
    f2 = _vec(fold + K, kk, k_mask)
    sums = _row_scalar(bufs.rowgrad, 0, 2 + 2 * CFG.N_TOK, 0, N, K)
    m = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    acc_c = tl.zeros([BLOCK_K], dtype=tl.float32)
    for s0 in range(0, B, BLOCK_M):
        samples = s0 + tl.arange(0, BLOCK_M)
        smask = samples < B
        tile_mask = smask[:, None] & k_mask[None, :]
        dz = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        for tb in range(0, row_tiles_per_sample):
            tiles = samples * row_tiles_per_sample + tb
            dz += tl.load(sums + (tiles[:, None] * CFG.N_PS + CFG.PS[j]) * K + kk[None, :], mask=tile_mask, other=0.0)
        slot = samples * CFG.N_PS + CFG.PS[j]
        z = tl.load(_sample_z(bufs.consts, D, K, B, CFG.S) + slot[:, None] * K + kk[None, :], mask=tile_mask,
                    other=0.0)
        stats = _sample_stats(bufs.consts, D, K, B, CFG.S, CFG.N_PS) + slot * 2
        mean = tl.load(stats, mask=smask, other=0.0)
        rstd = tl.load(stats + 1, mask=smask, other=0.0)
        c1 = tl.sum(dz * f1[None, :], axis=1) / width
        c2 = tl.sum(dz * (z - f2[None, :]), axis=1) / width
        dz_op = dz.to(op.dtype)
        x = _load_tile(streams.inputs[j], samples, smask, cols, col_mask, width)
        dx, xhat = _stream_input_grad(dz_op, x, w_op, lam, mean, rstd, c1, c2, col_mask, CFG.STREAM_LN, PRECISION)
        m = tl.dot(tl.trans(dz_op), xhat.to(op.dtype), acc=m, input_precision=PRECISION)
        acc_c += tl.sum(dz, axis=0)
        if CFG.MOD_GRAD:
            _store_tile(grads.dm[j], dx, samples, smask, cols, col_mask, width)
    _store_stream_grads(flat, offsets.stream[j], width, chunk, cols, col_mask, kk, k_mask, K, m, acc_c, w_op, lam, mu,
                        CFG.STREAM_LN)


@triton.jit
def _gate_unit(u: tl.constexpr, split, bufs, part, offsets, B, T, D, K, tiles_per_split, op, CFG: tl.constexpr,
               PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Unit u < SG: gate u's weights over the split's tiles, dG_{u,i} = dl_u^T a_i and dg_u = sum dl_u; unit
    SG + j (GMU form): dV_j = dpre_j^T a_j. dl and dpre come from the row kernel (KGRAD), a_i from the saved
    pre-activations."""
    N = B * T
    kk = tl.arange(0, BLOCK_K)
    k_mask = kk < K
    accs = ()
    for i in tl.static_range(tl.constexpr(CFG.S)):
        accs = accs + (tl.zeros([BLOCK_K, BLOCK_K], dtype=tl.float32),)
    acc_b = tl.zeros([BLOCK_K], dtype=tl.float32)
    first = split * tiles_per_split
    for tile in range(first, tl.minimum(first + tiles_per_split, B * tl.cdiv(T, BLOCK_M))):
        b, rows, row_mask = _tile_rows(tile, T, BLOCK_M)
        tile_mask = row_mask[:, None] & k_mask[None, :]
        # dl_u or dpre_j, loaded transposed: [BLOCK_K, BLOCK_M] (M = K: Hopper's wgmma)
        g_t = tl.load(_plane_t(bufs.kgrad, CFG.N_TOK + u, rows, kk, N, K), mask=tile_mask.T, other=0.0)
        if u < CFG.SG:
            for i in tl.static_range(tl.constexpr(CFG.S)):
                a = activation(_pre_activation(bufs, i, b, rows, row_mask, kk, k_mask, N, D, K, B, CFG, BLOCK_M),
                               CFG.ACT)
                accs = _tuple_add(accs, i, tl.dot(g_t.to(op.dtype), a.to(op.dtype), input_precision=PRECISION),
                                  CFG.S)
            acc_b += tl.sum(g_t.to(tl.float32), axis=1)
        else:
            a = activation(_pre_activation(bufs, u - CFG.SG, b, rows, row_mask, kk, k_mask, N, D, K, B, CFG,
                                           BLOCK_M), CFG.ACT)
            accs = _tuple_add(accs, 0, tl.dot(g_t.to(op.dtype), a.to(op.dtype), input_precision=PRECISION), CFG.S)
    row = part + split.to(tl.int64) * offsets.reduced + offsets.gate
    mask = k_mask[:, None] & k_mask[None, :]
    if u < CFG.SG:
        for i in tl.static_range(tl.constexpr(CFG.S)):
            tl.store(row + u * K * CFG.S * K + kk[:, None] * (CFG.S * K) + i * K + kk[None, :], accs[i], mask=mask)
        tl.store(row + CFG.SG * K * CFG.S * K + u * K + kk, acc_b, mask=k_mask)
    else:
        gmu = row + CFG.SG * K * CFG.S * K + CFG.SG * K + (u - CFG.SG) * K * K
        tl.store(gmu + kk[:, None] * K + kk[None, :], accs[0], mask=mask)


class Grads(NamedTuple):
    """The backward's input-gradient outputs (None where not wanted)."""
    dx: object
    dr: object
    dm: tuple           # per stream: the modality's gradient tensor (element 0, the text, unused)


@triton.jit
def gmu_bwd_cols_kernel(
    streams,                # Streams
    shared,                 # Params
    dy_ptr,                 # (N, D)
    r_ptr,                  # (N, D), read when FUSE_LN
    grads,                  # Grads: out dx (x's dtype), dr (r's), dm_j (the modalities')
    bufs,                   # Buffers: the forward's and gmu_bwd_rows_kernel's
    part,                   # out: (splits, offsets.reduced) fp32 partial gradients
    flat,                   # out: the final gradient buffer, whose part past offsets.reduced this kernel writes
    offsets,                # GradOffsets
    B, T, K,
    tiles_per_split,        # token tiles of BLOCK_M per split
    row_tiles_per_sample,   # gmu_bwd_rows_kernel's tiles per sample (its per-sample sums are per tile)
    CFG: tl.constexpr,      # Config
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CHUNKS: tl.constexpr,   # chunks of BLOCK_D columns per token-stream unit
):
    # units (axis 0): each stream's columns in stream order (CHUNKS * BLOCK_D columns per unit of a token stream,
    # BLOCK_D of a per-sample one), then the SG gates, then (GMU form) the S GMU matrices; per-sample streams'
    # units run in split 0 only
    unit = tl.program_id(0)
    split = tl.program_id(1)
    op = _operand(streams.inputs[0], r_ptr, CFG.FUSE_LN)
    start = 0
    for j in tl.static_range(tl.constexpr(CFG.S)):
        if CFG.ALIGNED[j]:
            chunks = tl.cdiv(streams.widths[j], CHUNKS * BLOCK_D)
        else:
            chunks = tl.cdiv(streams.widths[j], BLOCK_D)
        if (unit >= start) & (unit < start + chunks):
            if CFG.ALIGNED[j]:
                _token_stream_unit(streams, shared, j, unit - start, split, dy_ptr, r_ptr, grads, bufs, part, offsets,
                                   B, T, K, tiles_per_split, op, CFG, PRECISION, BLOCK_M, BLOCK_D, BLOCK_K, CHUNKS)
            elif split == 0:
                _sample_stream_unit(streams, j, unit - start, grads, bufs, flat, offsets, B, T, K,
                                    row_tiles_per_sample, op, CFG, PRECISION, BLOCK_M, BLOCK_D, BLOCK_K)
        start += chunks
    for u in tl.static_range(tl.constexpr(CFG.SG + CFG.S * CFG.GMU_FORM)):
        if unit == start + u:
            _gate_unit(u, split, bufs, part, offsets, B, T, streams.widths[0], K, tiles_per_split, op, CFG,
                       PRECISION, BLOCK_M, BLOCK_K)


# ----------------------------------------------------------------------------- launchers

import functools  # noqa: E402

import torch  # noqa: E402  (below the kernels: they need only triton)

from . import runtime  # noqa: E402
from .runtime import cdiv  # noqa: E402
from .codes import ACTIVATIONS, SCALE_MODES  # noqa: E402


def operand_dtype(x, r):
    """The dtype of the tensor-core operands (chosen the same way inside the kernels)."""
    return r.dtype if x.dtype == torch.float32 and r is not None else x.dtype


def tiles(kind, K, S, dtype):
    """Launch settings of one kernel: ``kind`` is prep, fwd, rows or cols (runtime.STREAM_STAGES read at each
    call: the cached settings are keyed on it)."""
    return _tiles(kind, K, S, dtype, runtime.STREAM_STAGES)


@functools.lru_cache(maxsize=None)
def _tiles(kind, K, S, dtype, stream_stages):
    """Small tiles in the interpreter (fast, and several chunks per row in the tests); on a GPU, tiles for
    tensor-core dots sized so that each kernel compiles for sm_90 without spills (python -m
    benchmarks.compile_report --only gmu)."""
    block_k = runtime.block_width(K)
    precision = "ieee" if dtype == torch.float32 else "tf32"  # 16-bit operands ignore it
    if runtime.interpreting():
        return dict(BLOCK_M=16, BLOCK_D=32 if kind != "cols" else 16, BLOCK_K=block_k, PRECISION=precision,
                    **({"CHUNKS": 2} if kind == "cols" else {}))
    if kind == "prep":
        # 8 warps: the one-pass per-sample projections took 121-151 registers at 4 (no spill); 128-column
        # chunks (half the steps) spill in the mix under triton 3.6 at 8 warps and take 230-255 at 4
        return dict(BLOCK_M=16, BLOCK_D=64, BLOCK_K=block_k, PRECISION=precision, num_warps=8)
    # two pipelining stages for the backward's kernels in 16-bit (runtime.STREAM_STAGES says why)
    stages = stream_stages if kind != "fwd" and dtype != torch.float32 else 1
    if kind == "cols":
        return dict(BLOCK_M=64, BLOCK_D=16, CHUNKS=2, BLOCK_K=block_k, PRECISION=precision, num_warps=8,
                    num_stages=stages)
    # the row kernel holds the gate's S activation and S gradient tiles at once: 32-row tiles; the forward with
    # more than two streams takes 16-column chunks (at 32, Triton 3.6 spills it in autocast's mix)
    return dict(BLOCK_M=32 if kind == "rows" else 64, BLOCK_D=16 if kind == "fwd" and S > 2 else 32, BLOCK_K=block_k,
                PRECISION=precision, num_warps=8, num_stages=stages)


@functools.lru_cache(maxsize=None)
def config(spec, aligned):
    """The kernels' Config for a spec (ampfuse.ops.gmu.GMUSpec) and the streams' layouts (text first)."""
    tok, ps = [], []
    for j, a in enumerate(aligned):
        tok.append(sum(aligned[:j]) if a else -1)
        ps.append(-1 if a else j - sum(aligned[:j]))
    S = len(aligned)
    return Config(S=S, SG=1 if spec.gate == "sigmoid" else S, ALIGNED=tuple(aligned), TOK=tuple(tok), PS=tuple(ps),
                  N_TOK=sum(aligned), N_PS=S - sum(aligned), STREAM_LN=spec.stream_ln, GMU_FORM=spec.form == "gmu",
                  FUSE_LN=spec.fuse_ln, ACT=ACTIVATIONS.index(spec.activation),
                  SCALE_MODE=SCALE_MODES.index(spec.scale_mode))


@functools.lru_cache(maxsize=None)
def gradient_layout(widths, aligned, K, spec, ln_grad):
    """(entries, offsets, total) of the backward's gradient buffer: entries (name, offset, shape) name the
    parameters ("stream_w.1", "gate_w", ...; "scale" is per channel even for a learned scalar, whose
    gradient is its sum); offsets is the kernels' GradOffsets. Token streams and the shared parameters
    come first (the part reduced from the splits' partials), per-sample streams after."""
    D, S = widths[0], len(widths)
    entries, stream = [], [0] * S
    offset = 0

    def add(name, shape):
        nonlocal offset
        entries.append((name, offset, shape))
        offset += int(torch.Size(shape).numel())

    def add_stream(j):
        stream[j] = offset
        add(f"stream_w.{j}", (K, widths[j]))
        add(f"stream_b.{j}", (K,))
        if spec.stream_ln:
            add(f"stream_ln_w.{j}", (widths[j],))
            add(f"stream_ln_b.{j}", (widths[j],))

    for j in range(S):
        if aligned[j]:
            add_stream(j)
    gate = offset
    gates = 1 if spec.gate == "sigmoid" else S
    add("gate_w", (gates, K, S * K))
    add("gate_b", (gates, K))
    if spec.form == "gmu":
        add("gmu_w", (S, K, K))
    up = offset
    add("w_up", (D, K))
    add("b_up", (D,))
    if spec.scale_mode != "float":
        entries.append(("scale", offset, (D,)))
    if ln_grad:
        entries += [("ln_weight", offset + D, (D,)), ("ln_bias", offset + 2 * D, (D,))]
    offset += 3 * D  # the scale and LayerNorm slots are kept whether or not they are written
    reduced = offset
    for j in range(S):
        if not aligned[j]:
            add_stream(j)
    return tuple(entries), GradOffsets(tuple(stream), gate, up, reduced), offset


def _kernel_args(spec, x, modalities, params):
    inputs = (x, *modalities)
    streams = Streams(inputs, tuple(t.shape[-1] for t in inputs), tuple(params.stream_w), tuple(params.stream_b),
                      None if not spec.stream_ln else tuple(params.stream_ln_w),
                      None if not spec.stream_ln else tuple(params.stream_ln_b))
    shared = Params(params.gate_w, params.gate_b, params.gmu_w, params.w_up, params.b_up, params.scale,
                    float(spec.scale_value), params.ln_weight, params.ln_bias)
    return streams, shared, config(spec, tuple(t.dim() == 3 for t in inputs))


@runtime.on_tensors_device
def forward(spec, x, r, modalities, params, save):
    """(y, Buffers) for contiguous x (B, T, D), r (B, T, D) under spec.fuse_ln, modalities (B, T, D_j) or
    (B, D_j): y in x's dtype, or that of x + r under spec.fuse_ln; the buffers' saved and fused (what backward
    reads besides the inputs and consts) only when ``save``."""
    B, T, D = x.shape
    K = params.w_up.shape[1]
    streams, shared, cfg = _kernel_args(spec, x, modalities, params)
    op = operand_dtype(x, r if spec.fuse_ln else None)
    consts = runtime.empty_output((consts_size(D, K, cfg.S, B, cfg.N_PS),), torch.float32, x.device)
    weights = runtime.empty_output((weights_size(K, cfg.S, cfg.SG, cfg.GMU_FORM),), op, x.device)
    prep = tiles("prep", K, cfg.S, op)
    programs = cfg.S + (cdiv(B, prep["BLOCK_M"]) if cfg.N_PS else 0)
    runtime.launch(gmu_prep_kernel, (programs,), streams, shared, consts, weights, B, K, float(spec.stream_ln_eps),
                   CFG=cfg, **prep)
    y = runtime.empty_output(x.shape, torch.promote_types(x.dtype, r.dtype) if spec.fuse_ln else x.dtype, x.device)
    bufs = Buffers(consts, weights, None, None)
    if save:
        bufs = Buffers(consts, weights, runtime.empty_output((saved_size(B * T, K, cfg.N_TOK),), torch.float32,
                                                             x.device),
                       runtime.empty_output((B * T, K), op, x.device))
    fwd = tiles("fwd", K, cfg.S, op)
    runtime.launch(gmu_fwd_kernel, (B * cdiv(T, fwd["BLOCK_M"]),), streams, shared, r, y, bufs, B, T, K,
                   float(spec.stream_ln_eps), float(spec.ln_eps), CFG=cfg, SAVE=save, **fwd)
    return y, bufs


@runtime.on_tensors_device
def backward(spec, dy, x, r, modalities, params, bufs, dr_grad, ln_grad, mod_grad, grad_dtype):
    """(dx, dr, dms, flat): dx in x's dtype; dr (r's dtype) when ``dr_grad``; dms (one per modality, in its
    dtype and shape) when ``mod_grad``, else Nones; flat the parameter gradients in ``grad_dtype`` placed by
    gradient_layout."""
    B, T, D = x.shape
    K = params.w_up.shape[1]
    streams, shared, cfg = _kernel_args(spec, x, modalities, params)
    cfg = cfg._replace(DR_GRAD=dr_grad, LN_GRAD=ln_grad, MOD_GRAD=mod_grad)
    op = operand_dtype(x, r if spec.fuse_ln else None)
    _, offsets, total = gradient_layout(streams.widths, cfg.ALIGNED, K, spec, ln_grad)

    rows = tiles("rows", K, cfg.S, op)
    row_tiles = cdiv(T, rows["BLOCK_M"])
    bufs = Buffers(bufs.consts, bufs.weights, bufs.saved, bufs.fused,
                   runtime.empty_output((kgrad_planes(cfg.N_TOK, cfg.S, cfg.SG, cfg.GMU_FORM), B * T, K), op, x.device),
                   runtime.empty_output((rowgrad_size(B * T, K, cfg.N_TOK, B * row_tiles, cfg.N_PS),), torch.float32,
                                        x.device))
    runtime.launch(gmu_bwd_rows_kernel, (B * row_tiles,), streams, shared, dy, r, bufs, B, T, K, CFG=cfg, **rows)

    cols = tiles("cols", K, cfg.S, op)
    token_tiles = B * cdiv(T, cols["BLOCK_M"])
    units = sum(cdiv(w, cols["BLOCK_D"] * (cols["CHUNKS"] if a else 1)) for w, a in zip(streams.widths, cfg.ALIGNED))
    units += cfg.SG + cfg.S * cfg.GMU_FORM
    splits = runtime.token_splits(token_tiles, units)
    tiles_per_split = cdiv(token_tiles, splits)
    splits = cdiv(token_tiles, tiles_per_split)
    dx = runtime.empty_output(x.shape, x.dtype, x.device)
    dr = runtime.empty_output(r.shape, r.dtype, r.device) if dr_grad else None
    dms = [runtime.empty_output(m.shape, m.dtype, m.device) if mod_grad else None for m in modalities]
    part = runtime.empty_output((splits, offsets.reduced), torch.float32, x.device)
    flat = runtime.empty_output((total,), grad_dtype, x.device)
    grads = Grads(dx, dr, (dx, *dms) if mod_grad else None)
    runtime.launch(gmu_bwd_cols_kernel, (units, splits), streams, shared, dy, r, grads, bufs, part, flat, offsets, B,
                   T, K, tiles_per_split, row_tiles, CFG=cfg, **cols)
    block = 1024
    runtime.launch(reduce_partials_kernel, (cdiv(offsets.reduced, block),), part, flat, splits,
                   offsets.reduced, BLOCK_T=block)
    return dx, dr, dms, flat
