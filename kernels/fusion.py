"""Fused layer-wise fusion (DESIGN.md section 3b): one forward launch, two backward launches.

Unlike the adapters, the gate and projection weights are d x (d + d_m) and d x d_m, so the
d-wide outputs are walked in chunks of BLOCK_N columns. A program owns BLOCK_M whole rows:

forward  pass A: shift chunk by chunk (gate and projection GEMMs), parked in y as scratch, with
                 the row sums that give alpha and the LayerNorm statistics in closed form;
         pass B: y = dropout(LN(x + alpha * shift)) from the parked shift.
backward kernel 1 (one row block per program): pass A again (shift parked in dx), pass B the
                 LayerNorm/alpha reductions, pass C d(shift) per chunk, the GEMM backward to dx
                 and the modalities, and the per-token gate/projection pre-activation gradients
                 written to an fp32 workspace (2 per modality, tokens x d);
         kernel 2: the weight gradients as GEMMs over tokens from that workspace (weights of
                 d^2 size do not fit in per-program partial slices), plus the LayerNorm partials.
"""

import triton
import triton.language as tl

from .common import dropout_keep, load_rows

SLOT_WG, SLOT_BG, SLOT_WP, SLOT_BP, SLOT_LNW, SLOT_LNB = map(tl.constexpr, (0, 4, 8, 12, 16, 17))  # read by kernels
NUM_SLOTS = 18


@triton.jit
def _pick(i: tl.constexpr, a, b, c, d):
    if i == 0:
        out = a
    elif i == 1:
        out = b
    elif i == 2:
        out = c
    else:
        out = d
    return out


@triton.jit
def _gate_proj(x_op, m_op, mcols, mcol_mask, Dm, wg_ptr, bg_ptr, wp_ptr, bp_ptr, n, n_mask, cols, col_mask, D,
               op_dtype, PRECISION: tl.constexpr):
    """Gate pre-activation [x; m] W_g[n]^T + b_g[n] and projection m W_p[n]^T + b_p[n], and the tiles."""
    stride = D + Dm
    wgx = tl.load(wg_ptr + n[:, None] * stride + cols[None, :], mask=n_mask[:, None] & col_mask[None, :], other=0.0)
    wgm = tl.load(wg_ptr + n[:, None] * stride + D + mcols[None, :], mask=n_mask[:, None] & mcol_mask[None, :],
                  other=0.0)
    wp = tl.load(wp_ptr + n[:, None] * Dm + mcols[None, :], mask=n_mask[:, None] & mcol_mask[None, :], other=0.0)
    bg = tl.load(bg_ptr + n, mask=n_mask, other=0.0).to(tl.float32)
    bp = tl.load(bp_ptr + n, mask=n_mask, other=0.0).to(tl.float32)
    gpre = tl.dot(x_op, tl.trans(wgx.to(op_dtype)), input_precision=PRECISION)
    gpre = tl.dot(m_op, tl.trans(wgm.to(op_dtype)), acc=gpre, input_precision=PRECISION) + bg[None, :]
    p = tl.dot(m_op, tl.trans(wp.to(op_dtype)), input_precision=PRECISION) + bp[None, :]
    return gpre, p, wgx, wgm, wp


@triton.jit
def _chunk_shift(x_op, n, n_mask, cols, col_mask, D, op_dtype,
                 m1, m2, m3, m4, mc1, mc2, mc3, mc4, mm1, mm2, mm3, mm4, D1, D2, D3, D4,
                 wg1, wg2, wg3, wg4, bg1, bg2, bg3, bg4, wp1, wp2, wp3, wp4, bp1, bp2, bp3, bp4,
                 NUM_MOD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """shift[:, n] = sum_m relu(gate_m) * proj_m for one chunk of output columns."""
    shift = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for i in tl.static_range(NUM_MOD):
        gpre, p, _, _, _ = _gate_proj(
            x_op, _pick(i, m1, m2, m3, m4), _pick(i, mc1, mc2, mc3, mc4), _pick(i, mm1, mm2, mm3, mm4),
            _pick(i, D1, D2, D3, D4), _pick(i, wg1, wg2, wg3, wg4), _pick(i, bg1, bg2, bg3, bg4),
            _pick(i, wp1, wp2, wp3, wp4), _pick(i, bp1, bp2, bp3, bp4), n, n_mask, cols, col_mask, D, op_dtype,
            PRECISION)
        shift += tl.maximum(gpre, 0.0) * p
    return shift


@triton.jit
def _shift_pass(x, x_ptr, scratch_ptr, rows, row_mask, cols, col_mask, D, beta, eps, ln_eps, op_dtype,
                m1, m2, m3, m4, mc1, mc2, mc3, mc4, mm1, mm2, mm3, mm4, D1, D2, D3, D4,
                wg1, wg2, wg3, wg4, bg1, bg2, bg3, bg4, wp1, wp2, wp3, wp4, bp1, bp2, bp3, bp4,
                NUM_MOD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Pass A: parks the shift in scratch; returns alpha, LN mean and rstd of x + alpha shift, ||x||,
    ||shift|| and sum(shift) per row. Moments of o = x + alpha shift are taken about mean(x)."""
    x_op = x.to(op_dtype)
    xbar = tl.sum(x, axis=1) / D
    xc = tl.where(col_mask[None, :], x - xbar[:, None], 0.0)
    x_norm = tl.sqrt(tl.sum(x * x, axis=1))
    s1 = tl.zeros([BLOCK_M], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    xs = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(0, D, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < D
        shift = _chunk_shift(x_op, n, n_mask, cols, col_mask, D, op_dtype, m1, m2, m3, m4, mc1, mc2, mc3, mc4,
                             mm1, mm2, mm3, mm4, D1, D2, D3, D4, wg1, wg2, wg3, wg4, bg1, bg2, bg3, bg4,
                             wp1, wp2, wp3, wp4, bp1, bp2, bp3, bp4, NUM_MOD, BLOCK_M, BLOCK_N, PRECISION)
        ptrs = rows[:, None] * D + n[None, :]
        cmask = row_mask[:, None] & n_mask[None, :]
        x_c = tl.load(x_ptr + ptrs, mask=cmask, other=0.0).to(tl.float32)
        s1 += tl.sum(shift, axis=1)
        s2 += tl.sum(shift * shift, axis=1)
        xs += tl.sum(tl.where(cmask, x_c - xbar[:, None], 0.0) * shift, axis=1)
        tl.store(scratch_ptr + ptrs, shift.to(scratch_ptr.dtype.element_ty), mask=cmask)
    s_norm = tl.sqrt(s2)
    alpha = tl.minimum(beta * x_norm / (s_norm + eps), 1.0)
    shift_mean = alpha * s1 / D
    var = (tl.sum(xc * xc, axis=1) + 2.0 * alpha * xs + alpha * alpha * s2) / D - shift_mean * shift_mean
    return alpha, xbar + shift_mean, 1.0 / tl.sqrt(var + ln_eps), x_norm, s_norm, s1


@triton.jit
def _chunk(ptr, rows, row_mask, n, n_mask, D):
    ptrs = rows[:, None] * D + n[None, :]
    cmask = row_mask[:, None] & n_mask[None, :]
    return tl.load(ptr + ptrs, mask=cmask, other=0.0).to(tl.float32), ptrs, cmask


@triton.jit
def fusion_fwd_kernel(
    x_ptr, y_ptr, m1, m2, m3, m4, wg1, wg2, wg3, wg4, bg1, bg2, bg3, bg4, wp1, wp2, wp3, wp4, bp1, bp2, bp3, bp4,
    lnw_ptr, lnb_ptr, seed_ptr, p_drop, M, D, D1, D2, D3, D4, beta, eps, ln_eps,
    NUM_MOD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D1: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_D3: tl.constexpr, BLOCK_D4: tl.constexpr,
    DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    op_dtype = x_ptr.dtype.element_ty
    x, _, _, cols, col_mask = load_rows(x_ptr, rows, row_mask, D, BLOCK_D)
    # absent modalities point at x with width 1: harmless loads, never used
    t1, _, _, mc1, mm1 = load_rows(m1, rows, row_mask, D1, BLOCK_D1)
    t2, _, _, mc2, mm2 = load_rows(m2, rows, row_mask, D2, BLOCK_D2)
    t3, _, _, mc3, mm3 = load_rows(m3, rows, row_mask, D3, BLOCK_D3)
    t4, _, _, mc4, mm4 = load_rows(m4, rows, row_mask, D4, BLOCK_D4)
    alpha, mean, rstd, _, _, _ = _shift_pass(
        x, x_ptr, y_ptr, rows, row_mask, cols, col_mask, D, beta, eps, ln_eps, op_dtype,
        t1.to(op_dtype), t2.to(op_dtype), t3.to(op_dtype), t4.to(op_dtype), mc1, mc2, mc3, mc4, mm1, mm2, mm3, mm4,
        D1, D2, D3, D4, wg1, wg2, wg3, wg4, bg1, bg2, bg3, bg4, wp1, wp2, wp3, wp4, bp1, bp2, bp3, bp4,
        NUM_MOD, BLOCK_M, BLOCK_N, PRECISION)
    tl.debug_barrier()  # pass B reads the shift other threads parked
    for n0 in range(0, D, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < D
        shift, ptrs, cmask = _chunk(y_ptr, rows, row_mask, n, n_mask, D)
        x_c, x_c_offs, x_c_mask = _chunk(x_ptr, rows, row_mask, n, n_mask, D)
        tl.debug_barrier()  # every thread has read this chunk of scratch before any overwrites it
        lnw = tl.load(lnw_ptr + n, mask=n_mask, other=0.0).to(tl.float32)
        lnb = tl.load(lnb_ptr + n, mask=n_mask, other=0.0).to(tl.float32)
        y = ((x_c + alpha[:, None] * shift) - mean[:, None]) * rstd[:, None] * lnw[None, :] + lnb[None, :]
        if DROPOUT:
            y = tl.where(dropout_keep(tl.load(seed_ptr), ptrs, p_drop), y / (1.0 - p_drop), 0.0)
        tl.store(y_ptr + ptrs, y.to(y_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def fusion_bwd_kernel(
    dy_ptr, x_ptr, dx_ptr, dm1, dm2, dm3, dm4, ws_ptr, ln_part_ptr,
    m1, m2, m3, m4, wg1, wg2, wg3, wg4, bg1, bg2, bg3, bg4, wp1, wp2, wp3, wp4, bp1, bp2, bp3, bp4,
    lnw_ptr, lnb_ptr, seed_ptr, p_drop, M, D, D1, D2, D3, D4, beta, eps, ln_eps,
    NUM_MOD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D1: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_D3: tl.constexpr, BLOCK_D4: tl.constexpr,
    DROPOUT: tl.constexpr, PRECISION: tl.constexpr, LN_GRAD: tl.constexpr, MOD_GRAD: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    op_dtype = x_ptr.dtype.element_ty
    x, x_offs, x_mask, cols, col_mask = load_rows(x_ptr, rows, row_mask, D, BLOCK_D)
    t1, o1, k1, mc1, mm1 = load_rows(m1, rows, row_mask, D1, BLOCK_D1)
    t2, o2, k2, mc2, mm2 = load_rows(m2, rows, row_mask, D2, BLOCK_D2)
    t3, o3, k3, mc3, mm3 = load_rows(m3, rows, row_mask, D3, BLOCK_D3)
    t4, o4, k4, mc4, mm4 = load_rows(m4, rows, row_mask, D4, BLOCK_D4)
    t1, t2, t3, t4 = t1.to(op_dtype), t2.to(op_dtype), t3.to(op_dtype), t4.to(op_dtype)
    alpha, mean, rstd, x_norm, s_norm, s1 = _shift_pass(
        x, x_ptr, dx_ptr, rows, row_mask, cols, col_mask, D, beta, eps, ln_eps, op_dtype,
        t1, t2, t3, t4, mc1, mc2, mc3, mc4, mm1, mm2, mm3, mm4, D1, D2, D3, D4,
        wg1, wg2, wg3, wg4, bg1, bg2, bg3, bg4, wp1, wp2, wp3, wp4, bp1, bp2, bp3, bp4,
        NUM_MOD, BLOCK_M, BLOCK_N, PRECISION)
    tl.debug_barrier()

    # ---- pass B: LayerNorm backward reductions and d alpha (rows past M have dy = 0) ----
    sum_g = tl.zeros([BLOCK_M], dtype=tl.float32)
    sum_go = tl.zeros([BLOCK_M], dtype=tl.float32)
    sum_gs = tl.zeros([BLOCK_M], dtype=tl.float32)
    sum_os = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(0, D, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < D
        shift, ptrs, cmask = _chunk(dx_ptr, rows, row_mask, n, n_mask, D)
        x_c, x_c_offs, x_c_mask = _chunk(x_ptr, rows, row_mask, n, n_mask, D)
        dln, dln_offs, dln_mask = _chunk(dy_ptr, rows, row_mask, n, n_mask, D)
        if DROPOUT:
            dln = tl.where(dropout_keep(tl.load(seed_ptr), ptrs, p_drop), dln / (1.0 - p_drop), 0.0)
        ohat = tl.where(cmask, (x_c + alpha[:, None] * shift - mean[:, None]) * rstd[:, None], 0.0)
        g = dln * tl.load(lnw_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        sum_g += tl.sum(g, axis=1)
        sum_go += tl.sum(g * ohat, axis=1)
        sum_gs += tl.sum(g * shift, axis=1)
        sum_os += tl.sum(ohat * shift, axis=1)
        if LN_GRAD:
            part = ln_part_ptr + pid.to(tl.int64) * 2 * D
            tl.store(part + n, tl.sum(dln * ohat, axis=0), mask=n_mask)
            tl.store(part + D + n, tl.sum(dln, axis=0), mask=n_mask)
    c1 = sum_g / D
    c2 = sum_go / D
    d_alpha = rstd * (sum_gs - c1 * s1 - c2 * sum_os)
    free = beta * x_norm / (s_norm + eps) < 1.0  # alpha not clamped at 1: it depends on x and shift
    safe_x, safe_s = tl.maximum(x_norm, 1e-30), tl.maximum(s_norm, 1e-30)  # rows past M have both 0
    coef_x = tl.where(free & (x_norm > 0), d_alpha * beta / ((s_norm + eps) * safe_x), 0.0)
    coef_s = tl.where(free & (s_norm > 0), -d_alpha * beta * x_norm / ((s_norm + eps) * (s_norm + eps) * safe_s), 0.0)

    # ---- pass C: d shift, direct dx, and the GEMM backward per chunk ----
    dx_gemm = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dt1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
    dt2 = tl.zeros([BLOCK_M, BLOCK_D2], dtype=tl.float32)
    dt3 = tl.zeros([BLOCK_M, BLOCK_D3], dtype=tl.float32)
    dt4 = tl.zeros([BLOCK_M, BLOCK_D4], dtype=tl.float32)
    x_op = x.to(op_dtype)
    for n0 in range(0, D, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < D
        shift, ptrs, cmask = _chunk(dx_ptr, rows, row_mask, n, n_mask, D)
        x_c, x_c_offs, x_c_mask = _chunk(x_ptr, rows, row_mask, n, n_mask, D)
        dln, dln_offs, dln_mask = _chunk(dy_ptr, rows, row_mask, n, n_mask, D)
        tl.debug_barrier()  # every thread has read this chunk of scratch before any overwrites it
        if DROPOUT:
            dln = tl.where(dropout_keep(tl.load(seed_ptr), ptrs, p_drop), dln / (1.0 - p_drop), 0.0)
        ohat = tl.where(cmask, (x_c + alpha[:, None] * shift - mean[:, None]) * rstd[:, None], 0.0)
        g = dln * tl.load(lnw_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        do = tl.where(cmask, (g - c1[:, None] - ohat * c2[:, None]) * rstd[:, None], 0.0)
        d_shift = alpha[:, None] * do + coef_s[:, None] * shift
        tl.store(dx_ptr + ptrs, (do + coef_x[:, None] * x_c).to(dx_ptr.dtype.element_ty), mask=cmask)
        for i in tl.static_range(NUM_MOD):
            m_op = _pick(i, t1, t2, t3, t4)
            gpre, p, wgx, wgm, wp = _gate_proj(
                x_op, m_op, _pick(i, mc1, mc2, mc3, mc4), _pick(i, mm1, mm2, mm3, mm4), _pick(i, D1, D2, D3, D4),
                _pick(i, wg1, wg2, wg3, wg4), _pick(i, bg1, bg2, bg3, bg4), _pick(i, wp1, wp2, wp3, wp4),
                _pick(i, bp1, bp2, bp3, bp4), n, n_mask, cols, col_mask, D, op_dtype, PRECISION)
            d_gpre = tl.where(gpre > 0, d_shift * p, 0.0)
            d_p = d_shift * tl.maximum(gpre, 0.0)
            ws = ws_ptr + (2 * i) * M * D
            tl.store(ws + ptrs, d_gpre, mask=cmask)
            tl.store(ws + M * D + ptrs, d_p, mask=cmask)
            d_gpre_op, d_p_op = d_gpre.to(op_dtype), d_p.to(op_dtype)
            dx_gemm = tl.dot(d_gpre_op, wgx.to(op_dtype), acc=dx_gemm, input_precision=PRECISION)
            dm = tl.dot(d_gpre_op, wgm.to(op_dtype), input_precision=PRECISION)
            dm = tl.dot(d_p_op, wp.to(op_dtype), acc=dm, input_precision=PRECISION)
            if i == 0:
                dt1 += dm
            elif i == 1:
                dt2 += dm
            elif i == 2:
                dt3 += dm
            else:
                dt4 += dm
    tl.debug_barrier()  # the direct dx chunks are in place
    dx = tl.load(dx_ptr + x_offs, mask=x_mask, other=0.0).to(tl.float32) + dx_gemm
    tl.store(dx_ptr + x_offs, dx.to(dx_ptr.dtype.element_ty), mask=x_mask)
    if MOD_GRAD:
        tl.store(dm1 + o1, dt1.to(dm1.dtype.element_ty), mask=k1)
        if NUM_MOD >= 2:
            tl.store(dm2 + o2, dt2.to(dm2.dtype.element_ty), mask=k2)
        if NUM_MOD >= 3:
            tl.store(dm3 + o3, dt3.to(dm3.dtype.element_ty), mask=k3)
        if NUM_MOD >= 4:
            tl.store(dm4 + o4, dt4.to(dm4.dtype.element_ty), mask=k4)


@triton.jit
def _weight_grad_tile(a_ptr, x_ptr, m_ptr, out_w, out_b, tile, M, D, Dm, GATE: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr):
    """One [BLOCK_N, BLOCK_C] tile of dW = A^T [x; m] (GATE) or A^T m, summed over all M tokens;
    the tiles of column block 0 also write the bias gradient sum_t A."""
    C = D + Dm if GATE else Dm
    c_tiles = tl.cdiv(C, BLOCK_C)
    if tile < tl.cdiv(D, BLOCK_N) * c_tiles:
        n = (tile // c_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        c = (tile % c_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
        n_mask, c_mask = n < D, c < C
        acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
        bias = tl.zeros([BLOCK_N], dtype=tl.float32)
        for t0 in range(0, M, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
            t_mask = t < M
            a = tl.load(a_ptr + t[:, None] * D + n[None, :], mask=t_mask[:, None] & n_mask[None, :], other=0.0)
            if GATE:
                from_x = c < D
                b = tl.load(x_ptr + t[:, None] * D + c[None, :], mask=t_mask[:, None] & from_x[None, :], other=0.0)
                b += tl.load(m_ptr + t[:, None] * Dm + (c - D)[None, :],
                             mask=t_mask[:, None] & (c_mask & ~from_x)[None, :], other=0.0)
            else:
                b = tl.load(m_ptr + t[:, None] * Dm + c[None, :], mask=t_mask[:, None] & c_mask[None, :], other=0.0)
            acc = tl.dot(tl.trans(a), b.to(tl.float32), acc=acc, input_precision="ieee")
            bias += tl.sum(a, axis=0)
        tl.store(out_w + n[:, None] * C + c[None, :], acc, mask=n_mask[:, None] & c_mask[None, :])
        if tile % c_tiles == 0:
            tl.store(out_b + n, bias, mask=n_mask)


@triton.jit
def fusion_weight_grad_kernel(
    ws_ptr, x_ptr, m1, m2, m3, m4, ln_part_ptr, out_ptr, table, M, D, D1, D2, D3, D4, P_LN,
    NUM_MOD: tl.constexpr, LN_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_LN: tl.constexpr,
):
    """Job (axis 1) 2i: gate weights of modality i, 2i+1: its projection, 2*NUM_MOD: LayerNorm."""
    tile = tl.program_id(0)
    job = tl.program_id(1)
    for i in tl.static_range(NUM_MOD):
        m_ptr = _pick(i, m1, m2, m3, m4)
        Dm = _pick(i, D1, D2, D3, D4)
        if job == 2 * i:
            _weight_grad_tile(ws_ptr + (2 * i) * M * D, x_ptr, m_ptr, out_ptr + tl.load(table + SLOT_WG + i),
                              out_ptr + tl.load(table + SLOT_BG + i), tile, M, D, Dm, True, BLOCK_N, BLOCK_C, BLOCK_T)
        if job == 2 * i + 1:
            _weight_grad_tile(ws_ptr + (2 * i + 1) * M * D, x_ptr, m_ptr, out_ptr + tl.load(table + SLOT_WP + i),
                              out_ptr + tl.load(table + SLOT_BP + i), tile, M, D, Dm, False, BLOCK_N, BLOCK_C,
                              BLOCK_T)
    if LN_GRAD:
        if job == 2 * NUM_MOD:
            cols = tile * BLOCK_LN + tl.arange(0, BLOCK_LN)
            mask = cols < D
            dw = tl.zeros([BLOCK_LN], dtype=tl.float32)
            db = tl.zeros([BLOCK_LN], dtype=tl.float32)
            for p in range(0, P_LN):
                dw += tl.load(ln_part_ptr + p * 2 * D + cols, mask=mask, other=0.0)
                db += tl.load(ln_part_ptr + p * 2 * D + D + cols, mask=mask, other=0.0)
            tl.store(out_ptr + tl.load(table + SLOT_LNW) + cols, dw, mask=mask)
            tl.store(out_ptr + tl.load(table + SLOT_LNB) + cols, db, mask=mask)


# ----------------------------------------------------------------------------- launchers

import torch  # noqa: E402

from . import runtime  # noqa: E402


def gradient_layout(D, widths, ln_grad):
    """([(name, offset, shape)], offset table, total) of the flat fp32 gradient buffer."""
    entries = []
    for i, w in enumerate(widths):
        entries += [(f"gate_w.{i}", SLOT_WG + i, (D, D + w)), (f"gate_b.{i}", SLOT_BG + i, (D,)),
                    (f"proj_w.{i}", SLOT_WP + i, (D, w)), (f"proj_b.{i}", SLOT_BP + i, (D,))]
    if ln_grad:
        entries += [("ln_weight", SLOT_LNW, (D,)), ("ln_bias", SLOT_LNB, (D,))]
    return runtime.pack_layout(entries, NUM_SLOTS)


def _args(x, modalities, gate_w, gate_b, proj_w, proj_b):
    pad = lambda seq: list(seq) + [x] * (4 - len(seq))  # noqa: E731
    widths = [m.shape[-1] for m in modalities] + [1] * (4 - len(modalities))
    block_d = runtime.block_width(x.shape[-1])
    meta = dict(NUM_MOD=len(modalities), BLOCK_M=runtime.CONFIG["fusion_block_m"], BLOCK_D=block_d,
                # a [BLOCK_N, BLOCK_D] chunk of the gate weights is staged in shared memory
                BLOCK_N=min(runtime.CONFIG["fusion_block_n"], runtime.chunk_limit(block_d, x.element_size())),
                **{f"BLOCK_D{i + 1}": runtime.block_width(w) for i, w in enumerate(widths)},
                PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=4 if block_d <= 512 else 8)
    return (*pad(modalities), *pad(gate_w), *pad(gate_b), *pad(proj_w), *pad(proj_b)), widths, meta


def fusion_fwd(x, modalities, gate_w, gate_b, proj_w, proj_b, ln_weight, ln_bias, beta, eps, ln_eps, dropout_p,
               seed):
    """y for contiguous 2-D x (M, D) and modalities (M, D_i)."""
    M, D = x.shape
    y = runtime.empty_output((M, D), x.dtype, x.device)
    tensors, widths, meta = _args(x, modalities, gate_w, gate_b, proj_w, proj_b)
    runtime.launch(fusion_fwd_kernel, (triton.cdiv(M, meta["BLOCK_M"]),), x, y, *tensors, ln_weight, ln_bias,
                   x if seed is None else seed, float(dropout_p), M, D, *widths, float(beta), float(eps),
                   float(ln_eps), DROPOUT=dropout_p > 0, **meta)
    return y


def fusion_bwd(dy, x, modalities, gate_w, gate_b, proj_w, proj_b, ln_weight, ln_bias, beta, eps, ln_eps, dropout_p,
               seed, ln_grad, mod_grad):
    """(dx, [dm_i], flat): flat holds every parameter gradient in fp32, placed by gradient_layout."""
    M, D = x.shape
    tensors, widths, meta = _args(x, modalities, gate_w, gate_b, proj_w, proj_b)
    _, table, total = gradient_layout(D, [m.shape[-1] for m in modalities], ln_grad)
    blocks = triton.cdiv(M, meta["BLOCK_M"])
    dx = runtime.empty_output((M, D), x.dtype, x.device)
    dms = [runtime.empty_output(m.shape if mod_grad else (0,), m.dtype, m.device) for m in modalities]
    ws = runtime.empty_output((2 * len(modalities), M, D), torch.float32, x.device)
    ln_part = runtime.empty_output((blocks, 2, D) if ln_grad else (0,), torch.float32, x.device)
    runtime.launch(fusion_bwd_kernel, (blocks,), dy, x, dx, *(dms + [x] * (4 - len(dms))), ws,
                   ln_part if ln_grad else x, *tensors, ln_weight, ln_bias, x if seed is None else seed,
                   float(dropout_p), M, D, *widths, float(beta), float(eps), float(ln_eps), DROPOUT=dropout_p > 0,
                   LN_GRAD=ln_grad, MOD_GRAD=mod_grad, **meta)
    flat = runtime.empty_output((total,), torch.float32, x.device)
    block_n, block_c, block_ln = 32, 32, 256
    tiles = max([triton.cdiv(D, block_n) * triton.cdiv(D + w, block_c) for w in widths[:len(modalities)]]
                + [triton.cdiv(D, block_ln)])
    runtime.launch(fusion_weight_grad_kernel, (tiles, 2 * len(modalities) + 1), ws, x, *tensors[:4],
                   ln_part if ln_grad else x, flat, torch.tensor(table, dtype=torch.int64, device=x.device), M, D,
                   *widths, blocks, NUM_MOD=len(modalities), LN_GRAD=ln_grad, BLOCK_N=block_n, BLOCK_C=block_c,
                   BLOCK_T=runtime.CONFIG["fusion_block_t"], BLOCK_LN=block_ln)
    return dx, dms, flat
