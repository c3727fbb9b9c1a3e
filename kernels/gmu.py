"""Fused GMU adapter (DESIGN.md section 3a): one forward launch, two backward launches.

Programs own BLOCK_M tokens of one sample (grid: token blocks x samples), so a per-sample
modality is one [1, D_i] row per program: it is normalised and projected once per program by a
reduction, never per token. The S = 1 + K streams' activations live in one [BLOCK_M, S_PAD,
BLOCK_K] tile (or its [BLOCK_M, S_PAD*BLOCK_K] concatenation). The sigmoid gate of two streams
is the softmax gate with stream 1's logit fixed at 0 (sigmoid(l) = softmax(l, 0)), so one code
path serves both.

Every matrix that is D wide or S*K wide is walked in chunks of BLOCK_KC bottleneck features: the
stream projections W_j [K, D_j] and W_up [D, K] by K rows, the gate weights [S*K, SG*K] by
output columns. A whole weight staged at once (and its fp32 gradient, converted for the partial
store) needed 320-420 KiB of shared memory at d=768, over Hopper's 227 KiB.

Backward mirrors the adapter block: a persistent grid of P programs recomputes the forward of
its row blocks, writes dx (and dr, and the gradients of token-aligned modalities), and
accumulates every parameter gradient, and the gradients of per-sample modalities, in its own
fp32 slice of a [P, T] buffer that reduce_partials_kernel sums. Offsets into a slice come from a
small int64 table (SLOT_* below), -1 where a gradient is not computed.
"""

import triton
import triton.language as tl

from .common import (SCALE_CHANNEL, SCALE_FLOAT, SCALE_SCALAR, accumulate_partial, activation, activation_grad,
                     layer_norm_bwd, layer_norm_stats, load_rows, load_scale, normalize, sum_partials)

MAX_MODALITIES = 4
# Slots of the offset table: stream j's W, c, LN weight, LN bias at SLOT_W + j, ... (j = 0 text).
# (tl.constexpr: kernels read them.)
SLOT_W, SLOT_C, SLOT_LG, SLOT_LB = map(tl.constexpr, (0, 5, 10, 15))
SLOT_GATE_W, SLOT_GATE_B, SLOT_GMU_W, SLOT_W_UP, SLOT_B_UP, SLOT_SCALE, SLOT_LN_W, SLOT_LN_B = map(tl.constexpr,
                                                                                                   range(20, 28))
SLOT_DM = tl.constexpr(28)  # + i - 1 for modality stream i (per-sample modalities only)
NUM_SLOTS = 32


@triton.jit
def _modality_tile(m_ptr, rows, row_mask, b, Dm, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """A token-aligned modality's [BLOCK_M, BLOCK] rows, or a per-sample one's [1, BLOCK] row b."""
    if ALIGNED:
        out = load_rows(m_ptr, rows, row_mask, Dm, BLOCK)
    else:
        one = tl.zeros([1], dtype=tl.int64) + b
        out = load_rows(m_ptr, one, one >= 0, Dm, BLOCK)
    return out


@triton.jit
def _stream_input(x, cols, col_mask, D, lg_ptr, lb_ptr, eps, STREAM_LN: tl.constexpr):
    """(LN_j(x) or x, x_hat, rstd)."""
    if STREAM_LN:
        mean, rstd = layer_norm_stats(x, col_mask, D, eps)
        xhat = normalize(x, mean, rstd, col_mask)
        g = tl.load(lg_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        b = tl.load(lb_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        xn = xhat * g[None, :] + b[None, :]
    else:
        xhat = x
        rstd = tl.sum(x, axis=1)  # unused placeholder
        xn = x
    return xn, xhat, rstd


@triton.jit
def _chunk(X, q, NQ: tl.constexpr, KC: tl.constexpr):
    """Columns q*KC .. q*KC + KC of a [R, NQ*KC] tile, as [R, KC]."""
    X3 = tl.reshape(X, [X.shape[0], NQ, KC])
    return tl.sum(tl.where(tl.arange(0, NQ)[None, :, None] == q, X3, 0.0), axis=1)


@triton.jit
def _put_chunk(X, x, q, NQ: tl.constexpr, KC: tl.constexpr):
    """X with columns q*KC .. q*KC + KC replaced by x ([R, KC], or [1, KC] broadcast over rows)."""
    X3 = tl.where(tl.arange(0, NQ)[None, :, None] == q, x[:, None, :], tl.reshape(X, [X.shape[0], NQ, KC]))
    return tl.reshape(X3, [X.shape[0], NQ * KC])


@triton.jit
def _stream_pre(xn, w_ptr, c_ptr, kk, k_mask, cols, col_mask, D, op_dtype, ROWS_DOT: tl.constexpr,
                PRECISION: tl.constexpr):
    """(xn W_j[kk]^T + c_j[kk], the W_j rows [BLOCK_KC, BLOCK_D_j]): tl.dot for row tiles, a reduction
    for one row."""
    w = tl.load(w_ptr + kk[:, None] * D + cols[None, :], mask=k_mask[:, None] & col_mask[None, :], other=0.0)
    c = tl.load(c_ptr + kk, mask=k_mask, other=0.0).to(tl.float32)
    if ROWS_DOT:
        zz = tl.dot(xn.to(op_dtype), tl.trans(w.to(op_dtype)), input_precision=PRECISION)
    else:
        zz = tl.sum(xn[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    return zz + c[None, :], w


@triton.jit
def _stream_forward(A_cat, j, inp, cols, col_mask, D, w_ptr, c_ptr, lg_ptr, lb_ptr, K, eps, op_dtype,
                    ROWS_DOT: tl.constexpr, STREAM_LN: tl.constexpr, ACT: tl.constexpr, PRECISION: tl.constexpr,
                    NKC: tl.constexpr, NQ: tl.constexpr, KC: tl.constexpr):
    """A_cat with stream j's activations f(LN_j(inp) W_j^T + c_j) put in, chunk by chunk."""
    xn, _, _ = _stream_input(inp, cols, col_mask, D, lg_ptr, lb_ptr, eps, STREAM_LN)
    for c in range(0, NKC):
        kk = c * KC + tl.arange(0, KC)
        # (no '_' targets in a loop: triton 3.6 treats them as loop-carried values)
        zz, w = _stream_pre(xn, w_ptr, c_ptr, kk, kk < K, cols, col_mask, D, op_dtype, ROWS_DOT, PRECISION)
        A_cat = _put_chunk(A_cat, activation(zz, ACT), j * NKC + c, NQ, KC)
    return A_cat


@triton.jit
def _stream_bwd(inp, da, cols, col_mask, D, w_ptr, c_ptr, lg_ptr, lb_ptr, K, eps, op_dtype, part, table, j, first,
                ROWS_DOT: tl.constexpr, STREAM_LN: tl.constexpr, ACT: tl.constexpr, PRECISION: tl.constexpr,
                NKC: tl.constexpr, KC: tl.constexpr):
    """Backward of a_j = f(LN_j(inp) W_j^T + c_j) given da [rows, BLOCK_K]: accumulates the partials of
    W_j, c_j and LN_j, returns d inp (same shape as inp)."""
    xn, xhat, rstd = _stream_input(inp, cols, col_mask, D, lg_ptr, lb_ptr, eps, STREAM_LN)
    dxn = tl.zeros_like(xn)
    for c in range(0, NKC):
        kk = c * KC + tl.arange(0, KC)
        k_mask = kk < K
        zz, w = _stream_pre(xn, w_ptr, c_ptr, kk, k_mask, cols, col_mask, D, op_dtype, ROWS_DOT, PRECISION)
        dzz = _chunk(da, c, NKC, KC) * activation_grad(zz, ACT)
        if ROWS_DOT:
            dw = tl.dot(tl.trans(dzz.to(op_dtype)), xn.to(op_dtype), input_precision=PRECISION)
            dxn = tl.dot(dzz.to(op_dtype), w.to(op_dtype), acc=dxn, input_precision=PRECISION)
        else:
            dw = tl.sum(dzz[:, :, None] * xn[:, None, :], axis=0)
            dxn += tl.sum(dzz[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
        w_mask = k_mask[:, None] & col_mask[None, :]
        accumulate_partial(part + tl.load(table + SLOT_W + j) + kk[:, None] * D + cols[None, :], dw, w_mask, first)
        accumulate_partial(part + tl.load(table + SLOT_C + j) + kk, tl.sum(dzz, axis=0), k_mask, first)
    if STREAM_LN:
        g = tl.load(lg_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        accumulate_partial(part + tl.load(table + SLOT_LG + j) + cols, tl.sum(dxn * xhat, axis=0), col_mask, first)
        accumulate_partial(part + tl.load(table + SLOT_LB + j) + cols, tl.sum(dxn, axis=0), col_mask, first)
        dinp = layer_norm_bwd(dxn * g[None, :], xhat, rstd, col_mask, D)
    else:
        dinp = dxn
    return dinp


@triton.jit
def _gate_cols(gw_ptr, K, q, S: tl.constexpr, SG: tl.constexpr, BLOCK_K: tl.constexpr, S_PAD: tl.constexpr,
               KC: tl.constexpr):
    """Chunk q of the gate weights (SG, K, S*K) laid out as [S_PAD*BLOCK_K (stream i, feature c),
    S_PAD*BLOCK_K (gate j, feature r)], element G[j, r, i*K + c]: its columns q*KC .. q*KC + KC, as
    [S_PAD*BLOCK_K, KC], with offsets and mask (for the gradient)."""
    idx = tl.arange(0, S_PAD * BLOCK_K)
    i_s, i_c = idx // BLOCK_K, idx % BLOCK_K
    out = q * KC + tl.arange(0, KC)
    g_j, g_r = out // BLOCK_K, out % BLOCK_K
    offs = g_j[None, :] * (K * S * K) + g_r[None, :] * (S * K) + i_s[:, None] * K + i_c[:, None]
    mask = ((i_s < S) & (i_c < K))[:, None] & ((g_j < SG) & (g_r < K))[None, :]
    return tl.load(gw_ptr + offs, mask=mask, other=0.0), offs, mask


@triton.jit
def _gmu_tile(v_ptr, K, S: tl.constexpr, BLOCK_K: tl.constexpr, S_PAD: tl.constexpr):
    """GMU weights V (S, K, K) as [S_PAD, BLOCK_K (r), BLOCK_K (c)], with offsets and mask."""
    j3 = tl.arange(0, S_PAD)[:, None, None]
    r3 = tl.arange(0, BLOCK_K)[None, :, None]
    c3 = tl.arange(0, BLOCK_K)[None, None, :]
    offs = j3 * K * K + r3 * K + c3
    mask = (j3 < S) & (r3 < K) & (c3 < K)
    return tl.load(v_ptr + offs, mask=mask, other=0.0), offs, mask


@triton.jit
def _gmu_forward_rows(
    x, rows, row_mask, b, cols, col_mask, D,
    m1, m2, m3, m4, w0, w1, w2, w3, w4, c0, c1, c2, c3, c4,
    lg0, lg1, lg2, lg3, lg4, lb0, lb1, lb2, lb3, lb4,
    gw_ptr, gb_ptr, v_ptr, wu_ptr, bu_ptr,
    D1, D2, D3, D4, K, stream_eps, op_dtype,
    NUM_MOD: tl.constexpr, SG: tl.constexpr, S_PAD: tl.constexpr,
    ALIGNED1: tl.constexpr, ALIGNED2: tl.constexpr, ALIGNED3: tl.constexpr, ALIGNED4: tl.constexpr,
    BLOCK_D1: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_D3: tl.constexpr, BLOCK_D4: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KC: tl.constexpr,
    STREAM_LN: tl.constexpr, GMU_FORM: tl.constexpr, ACT: tl.constexpr, PRECISION: tl.constexpr,
):
    """Streams, gate and up-projection of one row block: (A3, H3, z3, fused, v)."""
    S: tl.constexpr = NUM_MOD + 1
    NKC: tl.constexpr = BLOCK_K // BLOCK_KC  # chunks of one stream's features
    NQ: tl.constexpr = S_PAD * NKC  # chunks of the concatenated streams
    kk = tl.arange(0, BLOCK_K)
    k_mask = kk < K
    sidx = tl.arange(0, S_PAD)
    a_cat = tl.zeros([BLOCK_M, S_PAD * BLOCK_K], dtype=tl.float32)
    a_cat = _stream_forward(a_cat, 0, x, cols, col_mask, D, w0, c0, lg0, lb0, K, stream_eps, op_dtype, True,
                            STREAM_LN, ACT, PRECISION, NKC, NQ, BLOCK_KC)
    # One block per modality: Triton has no arrays of pointers, and each modality's tile width
    # (BLOCK_D<i>) and layout (ALIGNED<i>) must be compile-time constants.
    if NUM_MOD >= 1:
        m, _, _, mc, mcm = _modality_tile(m1, rows, row_mask, b, D1, BLOCK_D1, ALIGNED1)
        a_cat = _stream_forward(a_cat, 1, m, mc, mcm, D1, w1, c1, lg1, lb1, K, stream_eps, op_dtype, ALIGNED1,
                                STREAM_LN, ACT, PRECISION, NKC, NQ, BLOCK_KC)
    if NUM_MOD >= 2:
        m, _, _, mc, mcm = _modality_tile(m2, rows, row_mask, b, D2, BLOCK_D2, ALIGNED2)
        a_cat = _stream_forward(a_cat, 2, m, mc, mcm, D2, w2, c2, lg2, lb2, K, stream_eps, op_dtype, ALIGNED2,
                                STREAM_LN, ACT, PRECISION, NKC, NQ, BLOCK_KC)
    if NUM_MOD >= 3:
        m, _, _, mc, mcm = _modality_tile(m3, rows, row_mask, b, D3, BLOCK_D3, ALIGNED3)
        a_cat = _stream_forward(a_cat, 3, m, mc, mcm, D3, w3, c3, lg3, lb3, K, stream_eps, op_dtype, ALIGNED3,
                                STREAM_LN, ACT, PRECISION, NKC, NQ, BLOCK_KC)
    if NUM_MOD >= 4:
        m, _, _, mc, mcm = _modality_tile(m4, rows, row_mask, b, D4, BLOCK_D4, ALIGNED4)
        a_cat = _stream_forward(a_cat, 4, m, mc, mcm, D4, w4, c4, lg4, lb4, K, stream_eps, op_dtype, ALIGNED4,
                                STREAM_LN, ACT, PRECISION, NKC, NQ, BLOCK_KC)
    A3 = tl.reshape(a_cat, [BLOCK_M, S_PAD, BLOCK_K])

    # gate: logits of the SG gates from all streams, a chunk of gate features at a time; streams past
    # SG get logit 0, padding -inf
    a_op = a_cat.to(op_dtype)
    logits = tl.zeros([BLOCK_M, S_PAD * BLOCK_K], dtype=tl.float32)
    for q in range(0, SG * NKC):
        g, g_offs, g_mask = _gate_cols(gw_ptr, K, q, S, SG, BLOCK_K, S_PAD, BLOCK_KC)
        logits = _put_chunk(logits, tl.dot(a_op, g.to(op_dtype), input_precision=PRECISION), q, NQ, BLOCK_KC)
    logits = tl.reshape(logits, [BLOCK_M, S_PAD, BLOCK_K])
    gb = tl.load(gb_ptr + sidx[:, None] * K + kk[None, :], mask=(sidx < SG)[:, None] & k_mask[None, :], other=0.0)
    s3 = sidx[None, :, None]
    logits = tl.where(s3 < SG, logits + gb.to(tl.float32)[None, :, :], tl.where(s3 < S, 0.0, float("-inf")))
    e = tl.exp(logits - tl.max(logits, axis=1)[:, None, :])
    z3 = e / tl.sum(e, axis=1)[:, None, :]
    if GMU_FORM:
        v_tile, _, _ = _gmu_tile(v_ptr, K, S, BLOCK_K, S_PAD)
        A3b = tl.permute(A3, (1, 0, 2))
        pre = tl.dot(A3b.to(op_dtype), tl.permute(v_tile, (0, 2, 1)).to(op_dtype), input_precision=PRECISION)
        H3 = tl.permute(2.0 * tl.sigmoid(2.0 * pre) - 1.0, (1, 0, 2))
    else:
        H3 = A3
    fused = tl.sum(z3 * H3, axis=1)

    # up-projection, a chunk of W_up's columns at a time
    v = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for c in range(0, NKC):
        kc = c * BLOCK_KC + tl.arange(0, BLOCK_KC)
        wut = tl.load(wu_ptr + cols[None, :] * K + kc[:, None], mask=(kc < K)[:, None] & col_mask[None, :], other=0.0)
        v = tl.dot(_chunk(fused, c, NKC, BLOCK_KC).to(op_dtype), wut.to(op_dtype), acc=v, input_precision=PRECISION)
    bu = tl.load(bu_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    return A3, H3, z3, fused, v + bu[None, :]


@triton.jit
def gmu_fwd_kernel(
    x_ptr, r_ptr, y_ptr,
    m1, m2, m3, m4, w0, w1, w2, w3, w4, c0, c1, c2, c3, c4,
    lg0, lg1, lg2, lg3, lg4, lb0, lb1, lb2, lb3, lb4,
    gw_ptr, gb_ptr, v_ptr, wu_ptr, bu_ptr, s_ptr, s_value, lnw_ptr, lnb_ptr,
    T, D, D1, D2, D3, D4, K, stream_eps, ln_eps,
    NUM_MOD: tl.constexpr, SG: tl.constexpr, S_PAD: tl.constexpr,
    ALIGNED1: tl.constexpr, ALIGNED2: tl.constexpr, ALIGNED3: tl.constexpr, ALIGNED4: tl.constexpr,
    BLOCK_D1: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_D3: tl.constexpr, BLOCK_D4: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KC: tl.constexpr,
    STREAM_LN: tl.constexpr, GMU_FORM: tl.constexpr, FUSE_LN: tl.constexpr, ACT: tl.constexpr,
    SCALE_MODE: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(1)
    t = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = t < T
    rows = b.to(tl.int64) * T + t
    x, offs, mask, cols, col_mask = load_rows(x_ptr, rows, row_mask, D, BLOCK_D)
    op_dtype = x_ptr.dtype.element_ty
    _, _, _, _, v = _gmu_forward_rows(
        x, rows, row_mask, b, cols, col_mask, D, m1, m2, m3, m4, w0, w1, w2, w3, w4, c0, c1, c2, c3, c4,
        lg0, lg1, lg2, lg3, lg4, lb0, lb1, lb2, lb3, lb4, gw_ptr, gb_ptr, v_ptr, wu_ptr, bu_ptr,
        D1, D2, D3, D4, K, stream_eps, op_dtype, NUM_MOD, SG, S_PAD, ALIGNED1, ALIGNED2, ALIGNED3, ALIGNED4,
        BLOCK_D1, BLOCK_D2, BLOCK_D3, BLOCK_D4, BLOCK_M, BLOCK_D, BLOCK_K, BLOCK_KC, STREAM_LN, GMU_FORM, ACT,
        PRECISION)
    o = x + v * load_scale(s_ptr, s_value, cols, col_mask, SCALE_MODE)
    if FUSE_LN:
        o += tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mean, rstd = layer_norm_stats(o, col_mask, D, ln_eps)
        lnw = tl.load(lnw_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        lnb = tl.load(lnb_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        o = normalize(o, mean, rstd, col_mask) * lnw[None, :] + lnb[None, :]
    tl.store(y_ptr + offs, o.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _modality_bwd(m_ptr, dm_ptr, da, rows, row_mask, b, Dm, w_ptr, c_ptr, lg_ptr, lb_ptr, K, eps, op_dtype,
                  part, table, j, first, BLOCK: tl.constexpr, ALIGNED: tl.constexpr, MOD_GRAD: tl.constexpr,
                  STREAM_LN: tl.constexpr, ACT: tl.constexpr, PRECISION: tl.constexpr, NKC: tl.constexpr,
                  KC: tl.constexpr):
    """Backward of modality stream j: dm is stored (token-aligned) or added to this program's
    per-sample slice (row b), whose rows the reduction sums over programs."""
    m, m_offs, m_mask, mc, mcm = _modality_tile(m_ptr, rows, row_mask, b, Dm, BLOCK, ALIGNED)
    if not ALIGNED:
        da = tl.sum(da, axis=0)[None, :]  # every row of the block shares the sample's stream
    dm = _stream_bwd(m, da, mc, mcm, Dm, w_ptr, c_ptr, lg_ptr, lb_ptr, K, eps, op_dtype, part, table, j, first,
                     ALIGNED, STREAM_LN, ACT, PRECISION, NKC, KC)
    if MOD_GRAD:
        if ALIGNED:
            tl.store(dm_ptr + m_offs, dm.to(dm_ptr.dtype.element_ty), mask=m_mask)
        else:
            ptrs = part + tl.load(table + SLOT_DM + j - 1) + b.to(tl.int64) * Dm + mc[None, :]
            tl.store(ptrs, tl.load(ptrs, mask=mcm[None, :], other=0.0) + dm, mask=mcm[None, :])


@triton.jit
def _zero_sample_slice(part, table, j, B, Dm, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    base = part + tl.load(table + SLOT_DM + j - 1)
    for bb in range(0, B):
        tl.store(base + bb * Dm + cols, tl.zeros([BLOCK], dtype=tl.float32), mask=cols < Dm)


@triton.jit
def gmu_bwd_kernel(
    dy_ptr, x_ptr, r_ptr, dx_ptr, dr_ptr, dm1, dm2, dm3, dm4, part_ptr, table,
    m1, m2, m3, m4, w0, w1, w2, w3, w4, c0, c1, c2, c3, c4,
    lg0, lg1, lg2, lg3, lg4, lb0, lb1, lb2, lb3, lb4,
    gw_ptr, gb_ptr, v_ptr, wu_ptr, bu_ptr, s_ptr, s_value, lnw_ptr, lnb_ptr,
    B, T, D, D1, D2, D3, D4, K, stream_eps, ln_eps, P_STRIDE,
    NUM_MOD: tl.constexpr, SG: tl.constexpr, S_PAD: tl.constexpr,
    ALIGNED1: tl.constexpr, ALIGNED2: tl.constexpr, ALIGNED3: tl.constexpr, ALIGNED4: tl.constexpr,
    BLOCK_D1: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_D3: tl.constexpr, BLOCK_D4: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KC: tl.constexpr,
    STREAM_LN: tl.constexpr, GMU_FORM: tl.constexpr, FUSE_LN: tl.constexpr, ACT: tl.constexpr,
    SCALE_MODE: tl.constexpr, PRECISION: tl.constexpr, LN_GRAD: tl.constexpr, MOD_GRAD: tl.constexpr,
):
    S: tl.constexpr = NUM_MOD + 1
    NKC: tl.constexpr = BLOCK_K // BLOCK_KC
    NQ: tl.constexpr = S_PAD * NKC
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    part = part_ptr + pid.to(tl.int64) * P_STRIDE
    op_dtype = x_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    kk = tl.arange(0, BLOCK_K)
    k_mask = kk < K
    sidx = tl.arange(0, S_PAD)
    s = load_scale(s_ptr, s_value, cols, col_mask, SCALE_MODE)
    if MOD_GRAD:  # per-sample modality gradients are added row by row: start this slice at 0
        if NUM_MOD >= 1 and not ALIGNED1:
            _zero_sample_slice(part, table, 1, B, D1, BLOCK_D1)
        if NUM_MOD >= 2 and not ALIGNED2:
            _zero_sample_slice(part, table, 2, B, D2, BLOCK_D2)
        if NUM_MOD >= 3 and not ALIGNED3:
            _zero_sample_slice(part, table, 3, B, D3, BLOCK_D3)
        if NUM_MOD >= 4 and not ALIGNED4:
            _zero_sample_slice(part, table, 4, B, D4, BLOCK_D4)
    d_bu = tl.zeros([BLOCK_D], dtype=tl.float32)
    d_s = tl.zeros([BLOCK_D], dtype=tl.float32)
    d_lnw = tl.zeros([BLOCK_D], dtype=tl.float32)
    d_lnb = tl.zeros([BLOCK_D], dtype=tl.float32)
    blocks_per_sample = tl.cdiv(T, BLOCK_M)

    for block in range(pid, B * blocks_per_sample, num_programs):
        first = block == pid
        b = block // blocks_per_sample
        t = (block % blocks_per_sample) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = t < T
        rows = t.to(tl.int64) + b.to(tl.int64) * T
        x, offs, mask, x_cols, x_col_mask = load_rows(x_ptr, rows, row_mask, D, BLOCK_D)
        A3, H3, z3, fused, v = _gmu_forward_rows(
            x, rows, row_mask, b, cols, col_mask, D, m1, m2, m3, m4, w0, w1, w2, w3, w4, c0, c1, c2, c3, c4,
            lg0, lg1, lg2, lg3, lg4, lb0, lb1, lb2, lb3, lb4, gw_ptr, gb_ptr, v_ptr, wu_ptr, bu_ptr,
            D1, D2, D3, D4, K, stream_eps, op_dtype, NUM_MOD, SG, S_PAD, ALIGNED1, ALIGNED2, ALIGNED3, ALIGNED4,
            BLOCK_D1, BLOCK_D2, BLOCK_D3, BLOCK_D4, BLOCK_M, BLOCK_D, BLOCK_K, BLOCK_KC, STREAM_LN, GMU_FORM, ACT,
        PRECISION)

        # ---- output: y = LN(x + s v + r) or x + s v (rows past T have dy = 0 and add nothing) ----
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if FUSE_LN:
            o = x + v * s + tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            mean, rstd = layer_norm_stats(o, col_mask, D, ln_eps)
            ohat = normalize(o, mean, rstd, col_mask)
            lnw = tl.load(lnw_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            if LN_GRAD:
                d_lnw += tl.sum(dy * ohat, axis=0)
                d_lnb += tl.sum(dy, axis=0)
            do = layer_norm_bwd(dy * lnw[None, :], ohat, rstd, col_mask, D)
            tl.store(dr_ptr + offs, do.to(dr_ptr.dtype.element_ty), mask=mask)
        else:
            do = dy
        if SCALE_MODE != SCALE_FLOAT:
            d_s += tl.sum(do * v, axis=0)
        dv = do * s
        d_bu += tl.sum(dv, axis=0)
        # up-projection, a chunk of W_up's columns at a time
        dv_op = dv.to(op_dtype)
        dfused = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        for c in range(0, NKC):
            kc = c * BLOCK_KC + tl.arange(0, BLOCK_KC)
            wu_mask = col_mask[:, None] & (kc < K)[None, :]
            accumulate_partial(part + tl.load(table + SLOT_W_UP) + cols[:, None] * K + kc[None, :],
                               tl.dot(tl.trans(dv_op), _chunk(fused, c, NKC, BLOCK_KC).to(op_dtype),
                                      input_precision=PRECISION), wu_mask, first)
            wu = tl.load(wu_ptr + cols[:, None] * K + kc[None, :], mask=wu_mask, other=0.0)
            dfused = _put_chunk(dfused, tl.dot(dv_op, wu.to(op_dtype), input_precision=PRECISION), c, NKC, BLOCK_KC)

        # ---- gate: softmax over streams (sigmoid = softmax with a fixed 0 logit) ----
        dz3 = dfused[:, None, :] * H3
        dH3 = dfused[:, None, :] * z3
        dlogits = z3 * (dz3 - tl.sum(z3 * dz3, axis=1)[:, None, :])
        dlogits = tl.where(sidx[None, :, None] < SG, dlogits, 0.0)
        accumulate_partial(part + tl.load(table + SLOT_GATE_B) + sidx[:, None] * K + kk[None, :],
                           tl.sum(dlogits, axis=0), (sidx < SG)[:, None] & k_mask[None, :], first)
        a_op = tl.reshape(A3, [BLOCK_M, S_PAD * BLOCK_K]).to(op_dtype)
        dl_cat = tl.reshape(dlogits, [BLOCK_M, S_PAD * BLOCK_K])
        dA_cat = tl.zeros([BLOCK_M, S_PAD * BLOCK_K], dtype=tl.float32)
        for q in range(0, SG * NKC):  # a chunk of gate features at a time
            g, g_offs, g_mask = _gate_cols(gw_ptr, K, q, S, SG, BLOCK_K, S_PAD, BLOCK_KC)
            dl = _chunk(dl_cat, q, NQ, BLOCK_KC).to(op_dtype)
            accumulate_partial(part + tl.load(table + SLOT_GATE_W) + g_offs,
                               tl.dot(tl.trans(a_op), dl, input_precision=PRECISION), g_mask, first)
            dA_cat = tl.dot(dl, tl.trans(g.to(op_dtype)), acc=dA_cat, input_precision=PRECISION)
        dA3 = tl.reshape(dA_cat, [BLOCK_M, S_PAD, BLOCK_K])
        if GMU_FORM:
            v_tile, v_offs, v_mask = _gmu_tile(v_ptr, K, S, BLOCK_K, S_PAD)
            dpre = tl.permute(dH3 * (1.0 - H3 * H3), (1, 0, 2)).to(op_dtype)
            A3b = tl.permute(A3, (1, 0, 2)).to(op_dtype)
            accumulate_partial(part + tl.load(table + SLOT_GMU_W) + v_offs,
                               tl.dot(tl.permute(dpre, (0, 2, 1)), A3b, input_precision=PRECISION), v_mask, first)
            dA3 += tl.permute(tl.dot(dpre, v_tile.to(op_dtype), input_precision=PRECISION), (1, 0, 2))
        else:
            dA3 += dH3
        dA_cat = tl.reshape(dA3, [BLOCK_M, S_PAD * BLOCK_K])

        # ---- streams ----
        # x read again (it is in cache) rather than held through the gate and up-projection, where it
        # was spilled
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dx = do + _stream_bwd(x, _chunk(dA_cat, 0, S_PAD, BLOCK_K), cols, col_mask, D, w0, c0, lg0, lb0, K,
                              stream_eps, op_dtype, part, table, 0, first, True, STREAM_LN, ACT, PRECISION, NKC,
                              BLOCK_KC)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if NUM_MOD >= 1:
            _modality_bwd(m1, dm1, _chunk(dA_cat, 1, S_PAD, BLOCK_K), rows, row_mask, b, D1, w1, c1, lg1, lb1, K,
                          stream_eps, op_dtype, part, table, 1, first, BLOCK_D1, ALIGNED1, MOD_GRAD, STREAM_LN, ACT,
                          PRECISION, NKC, BLOCK_KC)
        if NUM_MOD >= 2:
            _modality_bwd(m2, dm2, _chunk(dA_cat, 2, S_PAD, BLOCK_K), rows, row_mask, b, D2, w2, c2, lg2, lb2, K,
                          stream_eps, op_dtype, part, table, 2, first, BLOCK_D2, ALIGNED2, MOD_GRAD, STREAM_LN, ACT,
                          PRECISION, NKC, BLOCK_KC)
        if NUM_MOD >= 3:
            _modality_bwd(m3, dm3, _chunk(dA_cat, 3, S_PAD, BLOCK_K), rows, row_mask, b, D3, w3, c3, lg3, lb3, K,
                          stream_eps, op_dtype, part, table, 3, first, BLOCK_D3, ALIGNED3, MOD_GRAD, STREAM_LN, ACT,
                          PRECISION, NKC, BLOCK_KC)
        if NUM_MOD >= 4:
            _modality_bwd(m4, dm4, _chunk(dA_cat, 4, S_PAD, BLOCK_K), rows, row_mask, b, D4, w4, c4, lg4, lb4, K,
                          stream_eps, op_dtype, part, table, 4, first, BLOCK_D4, ALIGNED4, MOD_GRAD, STREAM_LN, ACT,
                          PRECISION, NKC, BLOCK_KC)

    tl.store(part + tl.load(table + SLOT_B_UP) + cols, d_bu, mask=col_mask)
    if SCALE_MODE == SCALE_CHANNEL:
        tl.store(part + tl.load(table + SLOT_SCALE) + cols, d_s, mask=col_mask)
    elif SCALE_MODE == SCALE_SCALAR:
        tl.store(part + tl.load(table + SLOT_SCALE), tl.sum(d_s, axis=0))
    if LN_GRAD:
        tl.store(part + tl.load(table + SLOT_LN_W) + cols, d_lnw, mask=col_mask)
        tl.store(part + tl.load(table + SLOT_LN_B) + cols, d_lnb, mask=col_mask)


# ----------------------------------------------------------------------------- launchers

import torch  # noqa: E402

from . import runtime  # noqa: E402
from .runtime import ACTIVATION_CODES, scale_args  # noqa: E402


def _pointer_args(x, modalities, stream_w, stream_b, stream_ln_w, stream_ln_b, gate_w, gate_b, gmu_w, w_up,
                  b_up, scale, scale_value, ln_weight, ln_bias):
    """Kernel arguments shared by forward and backward; absent tensors are replaced by x (never read)."""
    pad = lambda seq, n: list(seq) + [x] * (n - len(seq))  # noqa: E731
    scale_mode, s_ptr, s_value = scale_args(scale, scale_value, x)
    stream_ln_w, stream_ln_b = stream_ln_w or [], stream_ln_b or []
    args = (*pad(modalities, 4), *pad(stream_w, 5), *pad(stream_b, 5), *pad(stream_ln_w, 5), *pad(stream_ln_b, 5),
            gate_w, gate_b, x if gmu_w is None else gmu_w, w_up, b_up, s_ptr, s_value,
            x if ln_weight is None else ln_weight, x if ln_bias is None else ln_bias)
    widths = [m.shape[-1] for m in modalities] + [1] * (4 - len(modalities))
    S = len(modalities) + 1
    block_k = max(16, triton.next_power_of_2(w_up.shape[1]))
    block_widths = [runtime.block_width(w) for w in [x.shape[-1], *widths]]
    meta = dict(
        NUM_MOD=len(modalities), SG=gate_w.shape[0], S_PAD=triton.next_power_of_2(S),
        **{f"ALIGNED{i + 1}": (i >= len(modalities) or modalities[i].dim() == 3) for i in range(4)},
        **{f"BLOCK_D{i + 1}": runtime.block_width(w) for i, w in enumerate(widths)},
        BLOCK_M=runtime.CONFIG["gmu_block_m"], BLOCK_D=runtime.block_width(x.shape[-1]),
        BLOCK_K=block_k,
        # chunks of W_j's rows [BLOCK_KC, BLOCK_D_j] and of their fp32 gradients stay <= 64 KiB
        BLOCK_KC=min(block_k, runtime.CONFIG["gmu_block_kc"], runtime.chunk_limit(max(block_widths), 4)),
        STREAM_LN=bool(stream_ln_w), GMU_FORM=gmu_w is not None, FUSE_LN=ln_weight is not None,
        SCALE_MODE=scale_mode, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=4 if x.shape[-1] <= 512 else 8)
    return args, widths, meta


def gmu_fwd(x, r, modalities, stream_w, stream_b, stream_ln_w, stream_ln_b, gate_w, gate_b, gmu_w, w_up, b_up, scale,
            scale_value, ln_weight, ln_bias, stream_ln_eps, ln_eps, activation):
    """y for contiguous x (B, T, D) and modalities (B, T, D_i) or (B, D_i)."""
    B, T, D = x.shape
    y = runtime.empty_output(x.shape, x.dtype, x.device)
    args, widths, meta = _pointer_args(x, modalities, stream_w, stream_b, stream_ln_w, stream_ln_b, gate_w,
                                       gate_b, gmu_w, w_up, b_up, scale, scale_value, ln_weight, ln_bias)
    grid = (triton.cdiv(T, meta["BLOCK_M"]), B)
    runtime.launch(gmu_fwd_kernel, grid, x, x if r is None else r, y, *args, T, D, *widths, w_up.shape[1],
                   float(stream_ln_eps), float(ln_eps), ACT=ACTIVATION_CODES[activation], **meta)
    return y


def gmu_bwd(dy, x, r, modalities, stream_w, stream_b, stream_ln_w, stream_ln_b, gate_w, gate_b, gmu_w, w_up, b_up,
            scale, scale_value, ln_weight, ln_bias, stream_ln_eps, ln_eps, activation, ln_grad, mod_grad, table,
            total):
    """(dx, dr, [dm_i of token-aligned modalities], flat): flat holds the fp32 parameter gradients and
    the per-sample modality gradients at the offsets of ``table`` (ampfuse.ops.gmu.gmu_gradient_layout)."""
    B, T, D = x.shape
    args, widths, meta = _pointer_args(x, modalities, stream_w, stream_b, stream_ln_w, stream_ln_b, gate_w,
                                       gate_b, gmu_w, w_up, b_up, scale, scale_value, ln_weight, ln_bias)
    blocks = B * triton.cdiv(T, meta["BLOCK_M"])
    P = max(1, min(blocks, runtime.max_programs(x.device)))
    dx = runtime.empty_output(x.shape, x.dtype, x.device)
    dr = runtime.empty_output(x.shape if r is not None else (0,), x.dtype, x.device)
    dms = [runtime.empty_output(m.shape if mod_grad and m.dim() == 3 else (0,), m.dtype, m.device)
           for m in modalities]
    part = runtime.empty_output((P, total), torch.float32, x.device)
    table_t = torch.tensor(table, dtype=torch.int64, device=x.device)
    runtime.launch(gmu_bwd_kernel, (P,), dy, x, x if r is None else r, dx, dr if r is not None else x,
                   *(dms + [x] * (4 - len(dms))), part, table_t, *args, B, T, D, *widths, w_up.shape[1],
                   float(stream_ln_eps), float(ln_eps), total, ACT=ACTIVATION_CODES[activation], LN_GRAD=ln_grad,
                   MOD_GRAD=mod_grad, **meta)
    return dx, dr, dms, sum_partials(part)


def gmu_gradient_layout(B, D, widths, aligned, K, gates, stream_ln, gmu, scale_numel, ln_grad, mod_grad):
    """([(name, offset, shape)], offset table, total) of everything backward writes to its flat
    fp32 buffer: parameter gradients, and the gradients of per-sample modalities (B, D_i)."""
    S = len(widths) + 1
    entries = []
    for j, width in enumerate([D, *widths]):
        entries += [(f"stream_w.{j}", SLOT_W + j, (K, width)), (f"stream_b.{j}", SLOT_C + j, (K,))]
        if stream_ln:
            entries += [(f"stream_ln_w.{j}", SLOT_LG + j, (width,)), (f"stream_ln_b.{j}", SLOT_LB + j, (width,))]
    entries += [("gate_w", SLOT_GATE_W, (gates, K, S * K)), ("gate_b", SLOT_GATE_B, (gates, K))]
    if gmu:
        entries.append(("gmu_w", SLOT_GMU_W, (S, K, K)))
    entries += [("w_up", SLOT_W_UP, (D, K)), ("b_up", SLOT_B_UP, (D,))]
    if scale_numel:
        entries.append(("scale", SLOT_SCALE, (scale_numel,)))
    if ln_grad:
        entries += [("ln_weight", SLOT_LN_W, (D,)), ("ln_bias", SLOT_LN_B, (D,))]
    if mod_grad:
        entries += [(f"modalities.{i}", SLOT_DM + i, (B, w)) for i, w in enumerate(widths) if not aligned[i]]
    return runtime.pack_layout(entries, NUM_SLOTS)
