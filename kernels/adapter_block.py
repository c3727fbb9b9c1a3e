"""Fused bottleneck adapter block (DESIGN.md section 2): one forward launch, two backward launches.

Every program owns BLOCK_M whole rows (tokens) of width D, held in registers as
[BLOCK_M, BLOCK_D] fp32 tiles (BLOCK_D = next power of two >= D, padded columns masked to 0).
The bottleneck is walked in chunks of BLOCK_K columns, so the k-wide activations never leave
the chip and only a [BLOCK_K, BLOCK_D] slice of each weight is live at a time.

Backward recomputes the forward of its rows (LayerNorm statistics, z = an W_down^T + b_down,
v = f(z) W_up^T + b_up) instead of saving anything but the inputs. Kernel 1 runs a grid of
P programs; program p walks row blocks p, p + P, ... writing dh and dr, and accumulates its
weight gradients in its own fp32 slice of a [P, T] partial buffer (no atomics, so results are
deterministic). Kernel 2 sums the P slices.
"""

import triton
import triton.language as tl

from .common import (SCALE_CHANNEL, SCALE_FLOAT, SCALE_SCALAR, accumulate_partial, activation, activation_grad,
                     dropout_keep, layer_norm_bwd, layer_norm_stats, load_scale, normalize, sum_partials)

@triton.jit
def _adapter_input(h, r, cols, col_mask, D, gamma_ptr, beta_ptr, ga_ptr, ba_ptr, eps, eps_a,
                   ORIG_LN_BEFORE: tl.constexpr, LN_BEFORE: tl.constexpr):
    """a = LN(h + r) or h; an = LN_a(a) or a. Returns the tiles backward needs too."""
    gamma = tl.load(gamma_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    if ORIG_LN_BEFORE:
        x1 = h + r
        mean1, rstd1 = layer_norm_stats(x1, col_mask, D, eps)
        x1hat = normalize(x1, mean1, rstd1, col_mask)
        a = x1hat * gamma[None, :] + beta[None, :]
    else:
        x1hat = h
        rstd1 = tl.sum(h, axis=1)  # unused placeholder
        a = h
    if LN_BEFORE:
        ga = tl.load(ga_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        ba = tl.load(ba_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        mean_a, rstd_a = layer_norm_stats(a, col_mask, D, eps_a)
        ahat = normalize(a, mean_a, rstd_a, col_mask)
        an = ahat * ga[None, :] + ba[None, :]
    else:
        ahat = a
        rstd_a = rstd1
        an = a
    return gamma, beta, x1hat, rstd1, a, ahat, rstd_a, an


@triton.jit
def _normalized_inputs(h_ptr, r_ptr, offs, mask, cols, col_mask, D, gamma_ptr, beta_ptr, ga_ptr, ba_ptr, eps, eps_a,
                       ORIG_LN_BEFORE: tl.constexpr, LN_BEFORE: tl.constexpr):
    """(x1_hat, rstd1, a_hat, rstd_a) of a row block, from h and r read again."""
    h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    _, _, x1hat, rstd1, _, ahat, rstd_a, _ = _adapter_input(
        h, r, cols, col_mask, D, gamma_ptr, beta_ptr, ga_ptr, ba_ptr, eps, eps_a, ORIG_LN_BEFORE, LN_BEFORE)
    return x1hat, rstd1, ahat, rstd_a


@triton.jit
def _load_w_down(wd_ptr, bd_ptr, kk, k_mask, cols, col_mask, D):
    """W_down[kk, :] as [BLOCK_K, BLOCK_D] and b_down[kk]."""
    wd = tl.load(wd_ptr + kk[:, None] * D + cols[None, :], mask=k_mask[:, None] & col_mask[None, :], other=0.0)
    return wd, tl.load(bd_ptr + kk, mask=k_mask, other=0.0).to(tl.float32)


@triton.jit
def _load_w_up_t(wu_ptr, kk, k_mask, cols, col_mask, K):
    """W_up[:, kk] transposed to [BLOCK_K, BLOCK_D]."""
    return tl.load(wu_ptr + cols[None, :] * K + kk[:, None], mask=k_mask[:, None] & col_mask[None, :], other=0.0)


@triton.jit
def _up_projection(an_op, wd_ptr, bd_ptr, wu_ptr, bu_ptr, cols, col_mask, D, K,
                   BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
                   ACT: tl.constexpr, PRECISION: tl.constexpr):
    """v = f(an W_down^T + b_down) W_up^T + b_up, the bottleneck kept on chip chunk by chunk."""
    v = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        wd, bd = _load_w_down(wd_ptr, bd_ptr, kk, kk < K, cols, col_mask, D)
        wut = _load_w_up_t(wu_ptr, kk, kk < K, cols, col_mask, K)
        z = tl.dot(an_op, tl.trans(wd.to(an_op.dtype)), input_precision=PRECISION) + bd[None, :]
        p = activation(z, ACT)
        v = tl.dot(p.to(an_op.dtype), wut.to(an_op.dtype), acc=v, input_precision=PRECISION)
    bu = tl.load(bu_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    return v + bu[None, :]


@triton.jit
def _adapter_rows(h, r, offs, cols, col_mask, D, K, gamma_ptr, beta_ptr, ga_ptr, ba_ptr, wd_ptr, bd_ptr, wu_ptr,
                  bu_ptr, s, seed_ptr, p_drop, eps, eps_a, op_dtype,
                  ORIG_LN_BEFORE: tl.constexpr, LN_BEFORE: tl.constexpr, RESIDUAL_BEFORE_LN: tl.constexpr,
                  ACT: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """The forward of a row block up to o = dropout(s v) + a_res + r, and what backward reuses."""
    gamma, beta, x1hat, rstd1, a, ahat, rstd_a, an = _adapter_input(
        h, r, cols, col_mask, D, gamma_ptr, beta_ptr, ga_ptr, ba_ptr, eps, eps_a, ORIG_LN_BEFORE, LN_BEFORE)
    an_op = an.to(op_dtype)
    # The residual is summed before the bottleneck loop, so one tile stays live through it, not h and r.
    if RESIDUAL_BEFORE_LN:
        res = h + r
    else:
        res = a + r
    v = _up_projection(an_op, wd_ptr, bd_ptr, wu_ptr, bu_ptr, cols, col_mask, D, K,
                       BLOCK_M, BLOCK_D, BLOCK_K, ACT, PRECISION)
    u = v * s
    keep = u == u  # all kept without dropout
    if DROPOUT:
        keep = dropout_keep(tl.load(seed_ptr), offs, p_drop)
        u = tl.where(keep, u / (1.0 - p_drop), 0.0)
    o = u + res
    return gamma, beta, x1hat, rstd1, a, ahat, rstd_a, an_op, v, keep, o


@triton.jit
def adapter_block_fwd_kernel(
    h_ptr, r_ptr, y_ptr,
    gamma_ptr, beta_ptr, ga_ptr, ba_ptr,
    wd_ptr, bd_ptr, wu_ptr, bu_ptr, s_ptr, s_value,
    seed_ptr, p_drop,
    M, D, K, eps, eps_a,
    ORIG_LN_BEFORE: tl.constexpr, LN_BEFORE: tl.constexpr, RESIDUAL_BEFORE_LN: tl.constexpr,
    ACT: tl.constexpr, SCALE_MODE: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    mask = (rows < M)[:, None] & col_mask[None, :]
    offs = rows[:, None] * D + cols[None, :]

    h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    gamma, beta, _, _, _, _, _, _, _, _, o = _adapter_rows(
        h, r, offs, cols, col_mask, D, K, gamma_ptr, beta_ptr, ga_ptr, ba_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr,
        load_scale(s_ptr, s_value, cols, col_mask, SCALE_MODE), seed_ptr, p_drop, eps, eps_a, h_ptr.dtype.element_ty,
        ORIG_LN_BEFORE, LN_BEFORE, RESIDUAL_BEFORE_LN, ACT, DROPOUT, PRECISION, BLOCK_M, BLOCK_D, BLOCK_K)
    mean_o, rstd_o = layer_norm_stats(o, col_mask, D, eps)
    y = normalize(o, mean_o, rstd_o, col_mask) * gamma[None, :] + beta[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def adapter_block_bwd_kernel(
    dy_ptr, h_ptr, r_ptr, dh_ptr, dr_ptr, part_ptr,
    gamma_ptr, beta_ptr, ga_ptr, ba_ptr,
    wd_ptr, bd_ptr, wu_ptr, bu_ptr, s_ptr, s_value,
    seed_ptr, p_drop,
    M, D, K, eps, eps_a, T,
    OFF_WU, OFF_WD, OFF_BU, OFF_BD, OFF_S, OFF_GAMMA, OFF_BETA, OFF_GA, OFF_BA,
    ORIG_LN_BEFORE: tl.constexpr, LN_BEFORE: tl.constexpr, RESIDUAL_BEFORE_LN: tl.constexpr,
    ACT: tl.constexpr, SCALE_MODE: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    LN_GRAD: tl.constexpr, INPUT_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    part = part_ptr + pid.to(tl.int64) * T
    op_dtype = h_ptr.dtype.element_ty
    s = load_scale(s_ptr, s_value, cols, col_mask, SCALE_MODE)

    # Per-program accumulators of the D-wide gradients (rows beyond M have dy = 0, so they add 0).
    d_bu = tl.zeros([BLOCK_D], dtype=tl.float32)
    d_gamma = tl.zeros([BLOCK_D], dtype=tl.float32)
    d_beta = tl.zeros([BLOCK_D], dtype=tl.float32)
    d_ga = tl.zeros([BLOCK_D], dtype=tl.float32)
    d_ba = tl.zeros([BLOCK_D], dtype=tl.float32)
    d_s = tl.zeros([BLOCK_D], dtype=tl.float32)

    for block in range(pid, tl.cdiv(M, BLOCK_M), num_programs):
        first = block == pid
        rows = tl.arange(0, BLOCK_M).to(tl.int64) + block * BLOCK_M
        mask = (rows < M)[:, None] & col_mask[None, :]
        offs = rows[:, None] * D + cols[None, :]

        # ---- recompute the forward of these rows ----
        h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        gamma, beta, _, _, _, _, _, an_op, v, keep, o = _adapter_rows(
            h, r, offs, cols, col_mask, D, K, gamma_ptr, beta_ptr, ga_ptr, ba_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr, s,
            seed_ptr, p_drop, eps, eps_a, op_dtype, ORIG_LN_BEFORE, LN_BEFORE, RESIDUAL_BEFORE_LN, ACT, DROPOUT,
            PRECISION, BLOCK_M, BLOCK_D, BLOCK_K)
        mean_o, rstd_o = layer_norm_stats(o, col_mask, D, eps)
        ohat = normalize(o, mean_o, rstd_o, col_mask)

        # ---- output LayerNorm and the scaled, dropped-out up-projection ----
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if LN_GRAD:
            d_gamma += tl.sum(dy * ohat, axis=0)
            d_beta += tl.sum(dy, axis=0)
        do = layer_norm_bwd(dy * gamma[None, :], ohat, rstd_o, col_mask, D)
        du = do
        if DROPOUT:
            du = tl.where(keep, do / (1.0 - p_drop), 0.0)
        if SCALE_MODE != SCALE_FLOAT:
            d_s += tl.sum(du * v, axis=0)
        dv = du * s
        d_bu += tl.sum(dv, axis=0)

        # ---- bottleneck, chunk by chunk: weight-gradient partials and d(an) ----
        dv_op = dv.to(op_dtype)
        dan = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_mask = kk < K
            # W_up's chunk is dead before W_down's is loaded, so the two never share shared memory
            # (at fp32, d=768 each takes 64 KiB).
            wut = _load_w_up_t(wu_ptr, kk, k_mask, cols, col_mask, K).to(op_dtype)
            dp = tl.dot(dv_op, tl.trans(wut), input_precision=PRECISION)
            wd, bd = _load_w_down(wd_ptr, bd_ptr, kk, k_mask, cols, col_mask, D)
            wd = wd.to(op_dtype)
            z = tl.dot(an_op, tl.trans(wd), input_precision=PRECISION) + bd[None, :]
            p = activation(z, ACT)
            dz = dp * activation_grad(z, ACT)
            dz_op = dz.to(op_dtype)
            w_mask = col_mask[:, None] & k_mask[None, :]
            accumulate_partial(part + OFF_WU + cols[:, None] * K + kk[None, :],
                                tl.dot(tl.trans(dv_op), p.to(op_dtype), input_precision=PRECISION), w_mask, first)
            accumulate_partial(part + OFF_WD + kk[:, None] * D + cols[None, :],
                                tl.dot(tl.trans(dz_op), an_op, input_precision=PRECISION), tl.trans(w_mask), first)
            accumulate_partial(part + OFF_BD + kk, tl.sum(dz, axis=0), k_mask, first)
            dan = tl.dot(dz_op, wd, acc=dan, input_precision=PRECISION)

        # ---- adapter LayerNorm, residual, frozen LayerNorm before the adapter ----
        # x1_hat and a_hat are recomputed from h and r (just read, so in cache): held through the
        # bottleneck loop they were spilled to local memory
        x1hat, rstd1, ahat, rstd_a = _normalized_inputs(h_ptr, r_ptr, offs, mask, cols, col_mask, D, gamma_ptr,
                                                        beta_ptr, ga_ptr, ba_ptr, eps, eps_a, ORIG_LN_BEFORE,
                                                        LN_BEFORE)
        if LN_BEFORE:
            ga = tl.load(ga_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            d_ga += tl.sum(dan * ahat, axis=0)
            d_ba += tl.sum(dan, axis=0)
            da = layer_norm_bwd(dan * ga[None, :], ahat, rstd_a, col_mask, D)
        else:
            da = dan
        if RESIDUAL_BEFORE_LN:
            dh = do
        else:
            da += do
            dh = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        dr = do
        if ORIG_LN_BEFORE:
            if LN_GRAD:
                d_gamma += tl.sum(da * x1hat, axis=0)
                d_beta += tl.sum(da, axis=0)
            dx1 = layer_norm_bwd(da * gamma[None, :], x1hat, rstd1, col_mask, D)
            dh += dx1
            dr += dx1
        else:
            dh += da
        if INPUT_GRAD:  # False below the lowest adapter: nothing upstream needs dh, dr
            tl.store(dh_ptr + offs, dh.to(dh_ptr.dtype.element_ty), mask=mask)
            tl.store(dr_ptr + offs, dr.to(dr_ptr.dtype.element_ty), mask=mask)

    tl.store(part + OFF_BU + cols, d_bu, mask=col_mask)
    if LN_GRAD:
        tl.store(part + OFF_GAMMA + cols, d_gamma, mask=col_mask)
        tl.store(part + OFF_BETA + cols, d_beta, mask=col_mask)
    if LN_BEFORE:
        tl.store(part + OFF_GA + cols, d_ga, mask=col_mask)
        tl.store(part + OFF_BA + cols, d_ba, mask=col_mask)
    if SCALE_MODE == SCALE_CHANNEL:
        tl.store(part + OFF_S + cols, d_s, mask=col_mask)
    elif SCALE_MODE == SCALE_SCALAR:
        tl.store(part + OFF_S, tl.sum(d_s, axis=0))


@triton.jit
def dropout_mask_kernel(seed_ptr, keep_ptr, numel, p_drop, BLOCK: tl.constexpr):
    """Materialises the keep-mask the fused kernels use (for tests and debugging only)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = dropout_keep(tl.load(seed_ptr), offs, p_drop)
    tl.store(keep_ptr + offs, keep.to(tl.int8), mask=offs < numel)


# ----------------------------------------------------------------------------- launchers

import torch  # noqa: E402  (kept below the kernels: the kernels themselves need only triton)

from . import runtime  # noqa: E402

def _config(D: int, K: int, element_size: int) -> dict:
    block_d = runtime.block_width(D)
    # The dots stage a [BLOCK_K, BLOCK_D] chunk of each weight in shared memory (fp32 at d=768 needed
    # 320 KiB with BLOCK_K=32, over Hopper's 227; compile_report shows it).
    return dict(
        BLOCK_M=runtime.CONFIG["adapter_block_m"],
        BLOCK_D=block_d,
        BLOCK_K=min(max(16, triton.next_power_of_2(K)), runtime.CONFIG["adapter_block_k"],
                    runtime.chunk_limit(block_d, element_size)),
        num_warps=4 if block_d <= 512 else 8,
    )


def _common_args(h, ln_weight, ln_bias, adapter_ln_weight, adapter_ln_bias, w_down, b_down, w_up, b_up,
                 scale, scale_value, seed, dropout_p):
    scale_mode, s_ptr, s_value = runtime.scale_args(scale, scale_value, h)
    ln_before = adapter_ln_weight is not None
    pointers = (
        ln_weight, ln_bias,
        adapter_ln_weight if ln_before else h, adapter_ln_bias if ln_before else h,
        w_down, b_down, w_up, b_up, s_ptr, s_value,
        seed if dropout_p > 0 else h, float(dropout_p),
    )
    flags = dict(
        LN_BEFORE=ln_before, SCALE_MODE=scale_mode, DROPOUT=dropout_p > 0,
        PRECISION="ieee" if h.dtype == torch.float32 else "tf32",
    )
    return pointers, flags


def adapter_block_fwd(h, r, ln_weight, ln_bias, w_down, b_down, w_up, b_up, scale, adapter_ln_weight,
                      adapter_ln_bias, scale_value, ln_eps, adapter_ln_eps, activation, original_ln_before,
                      residual_before_ln, dropout_p, seed):
    """y for contiguous 2-D h, r of shape (M, D); arguments as in ampfuse.ops.adapter_block."""
    M, D = h.shape
    K = w_down.shape[0]
    y = runtime.empty_output((M, D), h.dtype, h.device)
    pointers, flags = _common_args(h, ln_weight, ln_bias, adapter_ln_weight, adapter_ln_bias, w_down, b_down,
                                   w_up, b_up, scale, scale_value, seed, dropout_p)
    cfg = _config(D, K, h.element_size())
    grid = (triton.cdiv(M, cfg["BLOCK_M"]),)
    runtime.launch(adapter_block_fwd_kernel, grid, h, r, y, *pointers, M, D, K, float(ln_eps), float(adapter_ln_eps),
                   ORIG_LN_BEFORE=original_ln_before, RESIDUAL_BEFORE_LN=residual_before_ln,
                   ACT=runtime.ACTIVATION_CODES[activation], **flags, **cfg)
    return y


def adapter_block_bwd(dy, h, r, ln_weight, ln_bias, w_down, b_down, w_up, b_up, scale, adapter_ln_weight,
                      adapter_ln_bias, scale_value, ln_eps, adapter_ln_eps, activation, original_ln_before,
                      residual_before_ln, dropout_p, seed, ln_grad, input_grad, layout, T):
    """(dh, dr, flat) for contiguous 2-D inputs: flat holds the fp32 parameter gradients, each at its
    offset in ``layout`` (ampfuse.ops.adapter_block.gradient_layout), T elements in all. dh and dr
    are empty when ``input_grad`` is False."""
    M, D = h.shape
    K = w_down.shape[0]
    offsets = {name: offset for name, offset, _ in layout}
    cfg = _config(D, K, h.element_size())
    P = max(1, min(triton.cdiv(M, cfg["BLOCK_M"]), runtime.max_programs(h.device)))
    dx_shape = (M, D) if input_grad else (0,)
    dh = runtime.empty_output(dx_shape, h.dtype, h.device)
    dr = runtime.empty_output(dx_shape, h.dtype, h.device)
    part = runtime.empty_output((P, T), torch.float32, h.device)
    pointers, flags = _common_args(h, ln_weight, ln_bias, adapter_ln_weight, adapter_ln_bias, w_down, b_down,
                                   w_up, b_up, scale, scale_value, seed, dropout_p)
    seg = [offsets.get(name, -1) for name in
           ("w_up", "w_down", "b_up", "b_down", "scale", "ln_weight", "ln_bias", "adapter_ln_weight",
            "adapter_ln_bias")]
    runtime.launch(adapter_block_bwd_kernel, (P,), dy, h, r, dh, dr, part, *pointers,
                   M, D, K, float(ln_eps), float(adapter_ln_eps), T, *seg,
                   ORIG_LN_BEFORE=original_ln_before, RESIDUAL_BEFORE_LN=residual_before_ln,
                   ACT=runtime.ACTIVATION_CODES[activation], LN_GRAD=ln_grad, INPUT_GRAD=input_grad, **flags, **cfg)
    return dh, dr, sum_partials(part)


def dropout_keep_mask(seed, shape, dropout_p):
    """The int8 keep-mask (1 = kept) that the fused kernels apply for this seed, as a tensor."""
    numel = int(torch.Size(shape).numel())
    keep = torch.empty(shape, dtype=torch.int8, device=seed.device)
    block = 1024
    runtime.launch(dropout_mask_kernel, (max(1, triton.cdiv(numel, block)),), seed, keep, numel,
                   float(dropout_p), BLOCK=block)
    return keep.bool()
