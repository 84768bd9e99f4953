"""The WKV-7 operator of RWKV-7, with three interchangeable backends.

All backends follow the conventions of flash-linear-attention's ``chunk_rwkv7``:

* ``r, w, k, a, b``: ``[B, T, H, K]``; ``v``: ``[B, T, H, V]``;
* ``w`` is the *log* decay (``w <= 0``; RWKV-7 uses ``-exp(-0.5) * sigmoid(.)``);
* the state ``S`` is ``[B, H, K, V]`` and evolves per token as

      S_t = diag(exp(w_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T
      o_t = scale * S_t^T r_t

  (RWKV-7 passes ``a = -kk`` and ``b = kk * a_gate``).

Backends:

* ``"recurrent"``: the recurrence above, one token at a time. Short, obviously right, slow:
  the reference the others are tested against.
* ``"torch"``: a chunked pure-PyTorch form (diagonal-plus-low-rank / WY representation).
  Inside a chunk everything is dense matrix algebra; only a ``[K, V]`` state crosses chunks.
  Differentiable once (a hand-written backward, no double backward); this is the CPU path.
* ``"fla"``: fla's Triton ``chunk_rwkv7`` kernel, for CUDA tensors (or CPU tensors under
  Triton's interpreter, ``TRITON_INTERPRET=1``: slow, for tests). fla and Triton are imported
  when this backend runs, never at package import. With 16-bit inputs it uses the faster
  settings of fla's own RWKV-7 layer, which rely on ``w >= -exp(-0.5)`` (see :func:`wkv7_fla`).
* ``"auto"``: ``"fla"`` for CUDA tensors, ``"torch"`` otherwise.

Internally the torch and recurrent backends compute in float32 (float64 if the inputs are
float64), also inside a bf16 autocast region, return ``o`` in the input dtype and the final
state in the compute dtype.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

BACKENDS = ("auto", "fla", "torch", "recurrent")
DEFAULT_CHUNK_SIZE = 32
# Largest |log decay| accumulated over half a chunk that the factorised chunk form may meet:
# exp(+-40) stays far inside float32's range (and float64's).
_MAX_HALF_CHUNK_DECAY = 40.0


def _check_inputs(r, w, k, v, a, b, initial_state):
    if r.dim() != 4:
        raise ValueError(f"wkv7: r must be [B, T, H, K], got shape {tuple(r.shape)}")
    for name, x in (("w", w), ("k", k), ("a", a), ("b", b)):
        if x.shape != r.shape:
            raise ValueError(f"wkv7: {name} has shape {tuple(x.shape)} but r has {tuple(r.shape)}; "
                             "r, w, k, a, b must all be [B, T, H, K]")
    if v.dim() != 4 or v.shape[:3] != r.shape[:3]:
        raise ValueError(f"wkv7: v must be [B, T, H, V] with B, T, H of r {tuple(r.shape[:3])}, "
                         f"got {tuple(v.shape)}")
    if initial_state is not None:
        B, _, H, K = r.shape
        want = (B, H, K, v.shape[-1])
        if tuple(initial_state.shape) != want:
            raise ValueError(f"wkv7: initial_state must be [B, H, K, V] = {want}, "
                             f"got {tuple(initial_state.shape)}")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.autocast("cpu", enabled=False)
@torch.autocast("cuda", enabled=False)
def wkv7_recurrent(r, w, k, v, a, b, scale: float = 1.0, initial_state=None,
                   output_final_state: bool = False):
    """Reference: the plain per-token recurrence (see module docstring)."""
    B, T, H, K = r.shape
    V = v.shape[-1]
    dt = _compute_dtype(r)
    r, w, k, v, a, b = (x.to(dt) for x in (r, w, k, v, a, b))
    S = (torch.zeros(B, H, K, V, dtype=dt, device=r.device) if initial_state is None
         else initial_state.to(dt))
    outs = []
    # unbind over time (not x[:, t]), so the backward pass stays linear in T
    for r_t, w_t, k_t, v_t, a_t, b_t in zip(*(x.unbind(1) for x in (r, w, k, v, a, b))):
        sa = torch.einsum("bhk,bhkv->bhv", a_t, S)                           # a_t^T S_{t-1}
        S = (S * w_t.exp().unsqueeze(-1)
             + b_t.unsqueeze(-1) * sa.unsqueeze(-2)
             + k_t.unsqueeze(-1) * v_t.unsqueeze(-2))
        outs.append(torch.einsum("bhk,bhkv->bhv", r_t * scale, S))
    o = torch.stack(outs, dim=1) if T > 0 else v.new_zeros(B, 0, H, V, dtype=dt)
    return o.to(v.dtype), (S if output_final_state else None)


def _t(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-1, -2)


def _masks(L: int, device) -> torch.Tensor:
    """Entries to zero in the stacked intra-chunk matrix [[A_ab, A_ak], [A_rb, A_rk]]."""
    i = torch.arange(L, device=device)
    strict = i[None, :] >= i[:, None]                 # keep i < t  (the a-rows)
    incl = i[None, :] > i[:, None]                    # keep i <= t (the r-rows)
    return torch.cat([strict.repeat(1, 2), incl.repeat(1, 2)], dim=0)


def _decays(w: torch.Tensor):
    """Chunk-relative decay factors of log decays ``w`` ``[N, G, L, K]``.

    Returns ``ref`` (the inclusive cumulative log decay at the middle of each chunk,
    ``[N, G, 1, K]``), ``g - ref`` and the factors e^{g_t - ref}, e^{ref - g_t},
    e^{g_{t-1} - ref}. The backward calls this again instead of saving the three factors.
    """
    L = w.shape[2]
    g = w.cumsum(2)                                   # inclusive log decay within the chunk
    ref = g[:, :, L // 2: L // 2 + 1].clone()         # reference point, [N, G, 1, K]
    g_ref = g.sub_(ref)                               # g - ref
    e_ref = g_ref.exp()                               # e^{g_t - ref}
    inv = torch.reciprocal(e_ref)                     # e^{ref - g_t}
    e_gp = torch.sub(g_ref, w).exp_()                 # e^{g_{t-1} - ref}
    return ref, g_ref, e_ref, inv, e_gp


class _ChunkedWKV7(torch.autograd.Function):
    """The chunked WKV-7 with a hand-written backward (see :func:`wkv7_torch` for the algebra).

    Inputs in chunk-major layout: ``r, w, k, a, b`` ``[N, G, L, K]`` and ``v`` ``[N, G, L, V]``
    (N chunks of length L, G = batch * heads), ``s`` the initial state ``[G, K, V]``.
    Returns ``o`` ``[N, G, L, V]``, the final state ``[G, K, V]`` and, with ``want_starts``, the
    state before each chunk ``[N, G, K, V]`` (else None).

    The decayed queries and keys are stacked, Xq = [a'; r'] and Xk = [b'; k'], so the four
    intra-chunk matrices come from one product M = Xq Xk^T = [[A_ab, A_ak], [A_rb, A_rk]]
    and their gradients from two. The backward runs the adjoint recurrence over chunks
    (dS_n = e_in * (dP + W^T dU + r'^T dO)) and reuses the forward's saved products,
    recomputing the cheaper ones (decay factors, M, W, Z: 12% less saved memory); autograd
    through the same algebra keeps every temporary and took about twice as long on CPU.
    """

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    @torch.autocast("cuda", enabled=False)
    def forward(ctx, r, w, k, v, a, b, s, want_starts=False):
        N, G, L, K = r.shape
        V = v.shape[-1]
        NG = N * G
        dev, dt = r.device, r.dtype
        ref, g_ref, e_ref, inv, e_gp = _decays(w)
        Xq = torch.empty(N, G, 2 * L, K, dtype=dt, device=dev)
        Xk = torch.empty(N, G, 2 * L, K, dtype=dt, device=dev)
        torch.mul(a, e_gp, out=Xq[:, :, :L])              # a'
        torch.mul(r, e_ref, out=Xq[:, :, L:])             # r'
        torch.mul(b, inv, out=Xk[:, :, :L])               # b'
        torch.mul(k, inv, out=Xk[:, :, L:])               # k'
        Xq, Xk = Xq.view(NG, 2 * L, K), Xk.view(NG, 2 * L, K)
        a_, r_, k_ = Xq[:, :L], Xq[:, L:], Xk[:, L:]
        M = torch.bmm(Xq, _t(Xk)).masked_fill_(_masks(L, dev), 0)
        A_ab, A_ak = M[:, :L, :L], M[:, :L, L:]
        eye = torch.eye(L, dtype=dt, device=dev)
        # (I - A_ab)^{-1} once per chunk (cheaper than a solve per right-hand side)
        T_inv = torch.linalg.solve_triangular(eye - A_ab, eye.expand(NG, L, L), upper=False,
                                              unitriangular=True)
        UV = torch.empty(NG, 2 * L, V, dtype=dt, device=dev)   # [U; v]
        v_ = UV[:, L:]
        v_.copy_(v.reshape(NG, L, V))
        W = torch.bmm(T_inv, a_)
        # U_bar, completed to U in the loop. Its own contiguous buffer (copied into UV after
        # the loop): bmm / baddbmm_ into a strided view such as UV[:, :L] take a slow path.
        U = torch.bmm(T_inv, torch.bmm(A_ak, v_)).view(N, G, L, V)
        kv = torch.bmm(_t(k_), v_).view(N, G, K, V)
        e_in = ref.squeeze(2).exp().unsqueeze(-1)         # e^{ref}         [N, G, K, 1]
        e_out = g_ref[:, :, L - 1].exp().unsqueeze(-1)    # e^{g_L - ref}
        W4, Xk4 = W.view(N, G, L, K), Xk.view(N, G, 2 * L, K)
        Z = torch.empty(N, G, K, V, dtype=dt, device=dev)  # e^{ref} * chunk start state
        P = torch.empty(N, G, K, V, dtype=dt, device=dev)  # chunk end state / e^{g_L - ref}
        S = s
        starts = torch.empty(N, G, K, V, dtype=dt, device=dev) if want_starts else None
        for n in range(N):
            if starts is not None:
                starts[n] = S
            z = torch.mul(S, e_in[n], out=Z[n])
            u = U[n].baddbmm_(W4[n], z)                   # u_t = S_{t-1}^T a_t
            p = torch.add(kv[n], z, out=P[n]).baddbmm_(_t(Xk4[n, :, :L]), u)
            S = p * e_out[n]
        UV[:, :L].copy_(U.view(NG, L, V))
        o = torch.bmm(r_, Z.view(NG, K, V)).baddbmm_(M[:, L:], UV)  # r'Z + A_rb U + A_rk v
        ctx.save_for_backward(w, s, Xq, Xk, T_inv, UV, P, e_in, e_out)
        return o.view(N, G, L, V), S, starts

    @staticmethod
    @once_differentiable
    @torch.autocast("cpu", enabled=False)
    @torch.autocast("cuda", enabled=False)
    def backward(ctx, do, dS_final, dstarts=None):
        w, s, Xq, Xk, T_inv, UV, P, e_in, e_out = ctx.saved_tensors
        N, G, L, K = w.shape
        V = UV.shape[-1]
        NG = N * G
        dev, dt = UV.device, UV.dtype
        # Recomputed rather than saved (the same operations as the forward, so the same
        # values): the decay factors, M, W, and each chunk's scaled start state
        # Z_n = e^{ref_n} S_{n-1} from the saved end states P (S_n = P_n e^{g_L - ref}).
        _, _, e_ref, inv, e_gp = _decays(w)
        M = torch.bmm(Xq, _t(Xk)).masked_fill_(_masks(L, dev), 0)
        W = torch.bmm(T_inv, Xq[:, :L])
        Z = torch.empty(N, G, K, V, dtype=dt, device=dev)
        torch.mul(s, e_in[0], out=Z[0])
        if N > 1:
            torch.mul(P[:-1], e_out[:-1], out=Z[1:]).mul_(e_in[1:])
        Z_ = Z.view(NG, K, V)
        # [dY; dO]: dY = T_inv^T dU is the gradient of A_ak v (and, times Z^T, of a').
        DY = torch.empty(NG, 2 * L, V, dtype=dt, device=dev)
        do_ = DY[:, L:]
        do_.copy_(do.reshape(NG, L, V))
        # Reverse pass over chunks: gradients of each chunk's U, P and Z.
        dU = torch.bmm(_t(M[:, L:, :L]), do_).view(N, G, L, V)     # A_rb^T dO, completed below
        dZ = torch.bmm(_t(Xq[:, L:]), do_).view(N, G, K, V)        # r'^T dO, completed below
        dP = torch.empty(N, G, K, V, dtype=dt, device=dev)
        W4, Xk4 = W.view(N, G, L, K), Xk.view(N, G, 2 * L, K)
        dS = dS_final                  # zeros when the final state is unused (autograd fills them)
        for n in range(N - 1, -1, -1):
            dp = torch.mul(dS, e_out[n], out=dP[n])
            du = dU[n].baddbmm_(Xk4[n, :, :L], dp)
            dS = dZ[n].add_(dp).baddbmm_(_t(W4[n]), du).mul(e_in[n])
            if dstarts is not None:                     # the start state is an output too
                dS += dstarts[n]
        dP_, dU_ = dP.view(NG, K, V), dU.view(NG, L, V)
        DY[:, :L].copy_(torch.bmm(_t(T_inv), dU_))      # (not out=: a strided out is slow)
        # Gradient of M = [[A_ab, A_ak], [A_rb, A_rk]]: [dY; dO] [U; v]^T, masked like M.
        dM = torch.bmm(DY, _t(UV)).masked_fill_(_masks(L, dev), 0)
        dXq = torch.bmm(DY, _t(Z_)).baddbmm_(dM, Xk)      # [d a'; d r']
        dXk = torch.bmm(UV, _t(dP_)).baddbmm_(_t(dM), Xq)  # [d b'; d k']
        dv = torch.bmm(_t(M[:, :, L:]), DY).baddbmm_(Xk[:, L:], dP_)
        dXq, dXk = dXq.view(N, G, 2 * L, K), dXk.view(N, G, 2 * L, K)
        dr, dk = dXq[:, :, L:] * e_ref, dXk[:, :, L:] * inv
        da, db = dXq[:, :, :L] * e_gp, dXk[:, :, :L] * inv
        # Log-decay gradients: for x' = x e^{(.)}, d(.) = dx' * x'. From here on dXq, dXk,
        # dP and dZ are dead, so the products overwrite them: fresh [N, G, ...] temporaries
        # cost more than the arithmetic on CPU (the kernel zeroes every new page).
        tq, tk = dXq.mul_(Xq.view(N, G, 2 * L, K)), dXk.mul_(Xk.view(N, G, 2 * L, K))
        dgp = tq[:, :, :L]                                # via g_{t-1} - ref
        dg = tq[:, :, L:].sub_(tk[:, :, :L]).sub_(tk[:, :, L:]).add_(dgp)    # via g_t - ref
        dlog_out = dP.mul_(P).sum(-1)                     # via g_L - ref    [N, G, K]
        dref = dZ.mul_(Z).sum(-1).sub_(dlog_out).sub_(dg.sum(2))  # via ref (e_in, and above)
        dg[:, :, L // 2] += dref
        dg[:, :, L - 1] += dlog_out
        dw = dg.flip(2).cumsum(2).flip(2).sub_(dgp)       # g = cumsum(w), g_{t-1} = g_t - w_t
        return dr, dw, dk, dv.view(N, G, L, V), da, db, dS, None


def wkv7_torch(r, w, k, v, a, b, scale: float = 1.0, initial_state=None,
               output_final_state: bool = False, chunk_size: int = DEFAULT_CHUNK_SIZE,
               state_starts: Optional[Tuple[int, int]] = None):
    """Chunked WKV-7 in plain PyTorch, with a hand-written backward.

    Within a chunk of length L starting from state S0, write g_t for the cumulative log
    decay (inclusive) and u_t = S_{t-1}^T a_t. Unrolling the recurrence gives

        S_t = e^{g_t} S0 + sum_{i<=t} e^{g_t - g_i} (b_i u_i^T + k_i v_i^T)
        u_t = S0^T (a_t e^{g_{t-1}}) + sum_{i<t} <a_t e^{g_{t-1}-g_i}, b_i> u_i
                                       + <a_t e^{g_{t-1}-g_i}, k_i> v_i

    so U = (I - A_ab)^{-1} [(a e^{g_prev}) S0 + A_ak V] with strictly lower-triangular A_ab,
    A_ak: triangular solves per chunk, built for all chunks at once. Decay factors are taken
    relative to a reference point ``ref`` (the middle of the chunk): with
    a' = a e^{g_prev - ref}, r' = r e^{g - ref}, b' = b e^{ref - g}, k' = k e^{ref - g} and the
    scaled start state Z = e^{ref} S0,

        U = W Z + U_bar,  [W | U_bar] = (I - A_ab)^{-1} [a' | A_ak V],  A_xy = tril(x' y'^T)
        o = r' Z + A_rb U + A_rk V,     S_L = e^{g_L - ref} (Z + b'^T U + k'^T V)

    The only sequential work is Z -> U -> S_L per chunk, forward and (adjoint) backward.
    The exponentials stay within exp(+-L/2 * max|w|): with RWKV-7's |w| <= exp(-0.5) and
    L = 32 that is e^9.7. Stronger decays get a smaller chunk automatically, so any w <= 0
    is handled.
    """
    B, T, H, K = r.shape
    V = v.shape[-1]
    out_dtype = v.dtype
    dt = _compute_dtype(r)
    if T == 0:
        S = (torch.zeros(B, H, K, V, dtype=dt, device=r.device) if initial_state is None
             else initial_state.to(dt))
        return v.new_zeros(B, 0, H, V), (S if output_final_state else None)
    # Shrink the chunk if the decays are strong enough for exp(g) to leave float range
    # (never for RWKV-7's |w| <= 0.61 at the default chunk size).
    max_w = float(w.detach().abs().max()) if w.numel() else 0.0
    front = 0
    if state_starts is not None:
        # chunks of `every` tokens (1 if its decays are too strong), the sequence padded in front
        # so that a chunk starts at offset, offset + every, ...
        offset, every = state_starts
        chunk_size = every if every / 2 * max_w <= _MAX_HALF_CHUNK_DECAY else 1
        front = -offset % every
    while chunk_size > 1 and chunk_size / 2 * max_w > _MAX_HALF_CHUNK_DECAY:
        chunk_size //= 2
    L = max(1, min(chunk_size, T + front)) if state_starts is None else chunk_size
    N = (T + front + L - 1) // L
    pad = N * L - T - front

    def prep(x):  # [B, T, H, D] -> [N, B*H, L, D] in compute dtype, zero-padded at both ends
        x = x.to(dt)
        if pad or front:
            x = torch.nn.functional.pad(x, (0, 0, 0, 0, front, pad))
        return x.view(B, N, L, H, -1).permute(1, 0, 3, 2, 4).reshape(N, B * H, L, -1)

    # Padding with w = 0, k = v = a = b = 0 leaves the state untouched.
    r_, w_, k_, v_, a_, b_ = (prep(x) for x in (r, w, k, v, a, b))
    if scale != 1.0:
        r_ = r_ * scale
    s = (torch.zeros(B * H, K, V, dtype=dt, device=r.device) if initial_state is None
         else initial_state.to(dt).reshape(B * H, K, V))
    o, S, starts = _ChunkedWKV7.apply(r_, w_, k_, v_, a_, b_, s, state_starts is not None)
    o = o.view(N, B, H, L, V).permute(1, 0, 3, 2, 4).reshape(B, N * L, H, V)[:, front:front + T]
    if state_starts is not None:
        offset, every = state_starts
        stride = every // L
        return o.to(out_dtype), starts[(offset + front) // L::stride].view(-1, B, H, K, V)
    return o.to(out_dtype), (S.view(B, H, K, V) if output_final_state else None)


# fla's fast RWKV-7 settings (those of its own RWKV-7 layer): RWKV-7's log decay bound, and
# the chunk length that bound licenses.
FLA_LOWER_BOUND = -math.exp(-0.5)
FLA_FAST_CHUNK_SIZE = 64


def wkv7_fla(r, w, k, v, a, b, scale: float = 1.0, initial_state=None,
             output_final_state: bool = False, fast: Optional[bool] = None):
    """fla's Triton kernel: CUDA tensors, or CPU tensors under Triton's interpreter.

    CPU tensors are accepted only when ``TRITON_INTERPRET=1`` is set before triton is first
    imported (then every Triton kernel runs as numpy code: seconds per call, for tests only).

    ``fast``: the settings fla's own RWKV-7 layer uses, ``safe_gate=True``,
    ``lower_bound=-exp(-0.5)``, ``chunk_size=64``. They are safe for RWKV-7 because its log
    decay is ``-exp(-0.5) * sigmoid(.)``, so ``w >= -exp(-0.5)`` always (to float32 rounding;
    bf16 / fp16 round it inwards): with that bound the centred decay exponentials of a
    64-token chunk stay far inside float32's range (fla's limit is |w| <= 2.6 at that chunk
    length). fla does not check the bound; much stronger decays may overflow.
    The cost is precision: that path inverts the intra-chunk matrix in float16 blocks, about
    1e-4 relative error against a float64 recurrence (measured under the interpreter; the
    default path is near 1e-6). ``None`` (the default) picks it for 16-bit inputs, whose own
    rounding is larger, and the default path for float32.
    """
    if not r.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("wkv7 backend 'fla' needs CUDA tensors; use backend='torch' on CPU "
                           "(or 'auto', which picks it). On CPU it runs only under Triton's "
                           "interpreter: TRITON_INTERPRET=1 set before triton is imported")
    try:
        from fla.ops.rwkv7 import chunk_rwkv7
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise ImportError("wkv7 backend 'fla' needs flash-linear-attention and triton: "
                          "pip install flash-linear-attention triton") from e
    if fast is None:
        fast = r.dtype in (torch.bfloat16, torch.float16)
    opts = (dict(safe_gate=True, lower_bound=FLA_LOWER_BOUND, chunk_size=FLA_FAST_CHUNK_SIZE)
            if fast else {})
    # The kernel reads every input in float32 internally; it is given one dtype throughout.
    w, k, v, a, b = (x.to(r.dtype) for x in (w, k, v, a, b))
    o, S = chunk_rwkv7(r, w, k, v, a, b, scale=scale, initial_state=initial_state,
                       output_final_state=output_final_state, **opts)
    return o, S


def wkv7(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
         a: torch.Tensor, b: torch.Tensor, scale: float = 1.0,
         initial_state: Optional[torch.Tensor] = None, output_final_state: bool = False,
         backend: str = "auto", state_starts: Optional[Tuple[int, int]] = None
         ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """WKV-7 over a sequence. Returns ``(o [B,T,H,V], final_state [B,H,K,V] or None)``.

    ``state_starts=(offset, every)`` returns instead of the final state the states *before*
    positions offset, offset + every, ... (those below T), ``[n, B, H, K, V]``, differentiable:
    the torch backend takes them from its chunk boundaries (chunks of ``every`` tokens), the
    others run the sequence piece by piece."""
    if backend not in BACKENDS:
        raise ValueError(f"wkv7: unknown backend {backend!r}; choose one of {BACKENDS}")
    _check_inputs(r, w, k, v, a, b, initial_state)
    if backend == "auto":
        backend = "fla" if r.is_cuda else "torch"
    if state_starts is not None:
        offset, every = state_starts
        if offset < 0 or every < 1:
            raise ValueError(f"wkv7: state_starts=(offset, every) needs offset >= 0 and every >= 1, got {state_starts}")
        if backend == "torch":
            return wkv7_torch(r, w, k, v, a, b, scale, initial_state, state_starts=state_starts)
        return _states_piecewise(r, w, k, v, a, b, scale, initial_state, offset, every, backend)
    if backend == "fla":
        return wkv7_fla(r, w, k, v, a, b, scale, initial_state, output_final_state)
    if backend == "torch":
        return wkv7_torch(r, w, k, v, a, b, scale, initial_state, output_final_state)
    return wkv7_recurrent(r, w, k, v, a, b, scale, initial_state, output_final_state)


def _states_piecewise(r, w, k, v, a, b, scale, initial_state, offset, every, backend):
    """``wkv7(..., state_starts=(offset, every))`` by one call per piece, each from the state the
    one before left."""
    T = r.shape[1]
    cuts = [0] + list(range(offset, T, every)) + [T]
    outs, starts, S = [], [], initial_state
    for i, (p, q) in enumerate(zip(cuts[:-1], cuts[1:])):
        if i > 0:
            starts.append(S if S is not None else torch.zeros(
                r.shape[0], r.shape[2], r.shape[3], v.shape[-1], dtype=_compute_dtype(r), device=r.device))
        if q > p:
            o, S = wkv7(*(x[:, p:q] for x in (r, w, k, v, a, b)), scale=scale, initial_state=S,
                        output_final_state=True, backend=backend)
            outs.append(o)
    o = torch.cat(outs, 1) if outs else v.new_zeros(v.shape)
    return o, torch.stack(starts)
