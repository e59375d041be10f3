"""An independent, deliberately plain re-implementation of TempMe's video encoder, written from SPEC.md.

It mirrors the *structure* of the authors' code (a running-state dict updated layer by layer, explicit
softmax attention, bipartite matching with Python loops over tokens) so that the library's vectorised,
plan-driven implementation can be checked against it. Slow; for tiny models only. It reads weights
from a state dict in the OpenAI layout, so it shares no code with ``tempme.model`` or ``tempme.merging``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def layer_norm(x, sd, prefix):
    return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], eps=1e-5)


def reference_bsm(metric, x, size, r, num_cls):
    """Bipartite soft matching, one sequence at a time, token by token.

    metric [B, N, C], x [B, N, D], size [B, N, 1]. Returns merged (x, size).
    """
    out_x, out_size = [], []
    for seq in range(x.shape[0]):
        n = x.shape[1]
        patches = list(range(num_cls, n))
        sources = [i for i in patches if i % 2 == 0]
        destinations = [i for i in patches if i % 2 == 1]
        m = metric[seq] / metric[seq].norm(dim=-1, keepdim=True)
        best = {}
        for a in sources:
            scores = [float(m[a] @ m[b]) for b in destinations]
            top = max(range(len(scores)), key=lambda j: scores[j])  # first maximum on ties
            best[a] = (scores[top], destinations[top])
        ranked = sorted(sources, key=lambda a: -best[a][0])  # stable: ties keep position order
        merged, kept = ranked[:r], sorted(ranked[r:])
        weighted = {b: (size[seq, b] * x[seq, b], size[seq, b].clone()) for b in destinations}
        for a in merged:
            total, s = weighted[best[a][1]]
            weighted[best[a][1]] = (total + size[seq, a] * x[seq, a], s + size[seq, a])
        rows_x = [x[seq, i] for i in range(num_cls)] + [x[seq, a] for a in kept]
        rows_s = [size[seq, i] for i in range(num_cls)] + [size[seq, a] for a in kept]
        for b in destinations:
            total, s = weighted[b]
            rows_x.append(total / s)
            rows_s.append(s)
        out_x.append(torch.stack(rows_x))
        out_size.append(torch.stack(rows_s))
    return torch.stack(out_x), torch.stack(out_size)


def reference_attention(x, sd, prefix, heads, size, prop_attn):
    """Explicit-softmax attention with LoRA on the fused QKV; returns (output, head-mean keys)."""
    b, n, d = x.shape
    qkv = x @ sd[prefix + ".in_proj_weight"].T + sd[prefix + ".in_proj_bias"]
    qkv = qkv + (x @ sd[prefix + ".lora_a"].T) @ sd[prefix + ".lora_b"].T  # every model here has LoRA
    q, k, v = qkv.split(d, dim=-1)
    q = q.view(b, n, heads, -1).transpose(1, 2)
    k = k.view(b, n, heads, -1).transpose(1, 2)
    v = v.view(b, n, heads, -1).transpose(1, 2)
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
    if prop_attn and size is not None:
        logits = logits + size.log()[:, None, None, :, 0]
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
    out = out @ sd[prefix + ".out_proj.weight"].T + sd[prefix + ".out_proj.bias"]
    return out, k.mean(1)


def mlp(x, sd, prefix):
    h = x @ sd[prefix + ".c_fc.weight"].T + sd[prefix + ".c_fc.bias"]
    h = h * torch.sigmoid(1.702 * h)
    return h @ sd[prefix + ".c_proj.weight"].T + sd[prefix + ".c_proj.bias"]


def reference_video_features(sd, frames, *, heads, layers, method, tome_r, merge_layers=(), frame_nums=(),
                             p_cross=0.3, p_intra=0.1, prop_attn=True, clip_pos_embed=True, mask=None):
    """frames [B, F, 3, H, W] -> video features [B, D], following SPEC section 1 step by step."""
    b, num_frames = frames.shape[:2]
    patch = sd["visual.conv1.weight"].shape[-1]
    x = F.conv2d(frames.flatten(0, 1), sd["visual.conv1.weight"], stride=patch).flatten(2).transpose(1, 2)
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], 1) + sd["visual.positional_embedding"]
    x = layer_norm(x, sd, "visual.ln_pre")
    info = {"size": None, "c": 1, "n_clip": num_frames}  # the authors keep this running state
    for i in range(layers):
        p = f"visual.transformer.resblocks.{i}"
        T = x.shape[1]
        if method == "tempme" and i in merge_layers:
            f = frame_nums[merge_layers.index(i)]
            c_old = info["c"]
            metric = x.detach()
            size = info["size"] if info["size"] is not None else torch.ones(x.shape[0], T, 1)

            def join(t):
                t = t.view(b, info["n_clip"] // f, f, T, t.shape[-1])
                head = t[:, :, :, :c_old].reshape(b * info["n_clip"] // f, f * c_old, -1)
                tail = t[:, :, :, c_old:].reshape(b * info["n_clip"] // f, f * (T - c_old), -1)
                return torch.cat([head, tail], 1)

            r0 = min(int(T * f * p_cross), ((T - c_old) * f) // 2)
            if r0 > 0 and clip_pos_embed:
                x = (x.view(b, info["n_clip"], T, -1) + sd[p + ".clip_pos_embed"]).view_as(x)
            x, metric, size = join(x), join(metric), join(size)
            info["c"] *= f
            info["n_clip"] //= f
            if r0 > 0:
                x, info["size"] = reference_bsm(metric, x, size, r0, info["c"])
            elif info["size"] is not None:
                info["size"] = size  # the joined sizes; no merge yet means no size at all
            out, keys = reference_attention(layer_norm(x, sd, p + ".ln_1"), sd, p + ".attn", heads, info["size"], prop_attn)
            x = x + out
            r1 = min(int(x.shape[1] * p_intra), (x.shape[1] - info["c"]) // 2)
        else:
            out, keys = reference_attention(layer_norm(x, sd, p + ".ln_1"), sd, p + ".attn", heads, info["size"], prop_attn)
            x = x + out
            if method == "tome" or (method == "tempme" and i < merge_layers[0]):
                r1 = min(tome_r, (T - info["c"]) // 2)
            elif method == "tempme":
                r1 = min(int(T * p_intra), (T - info["c"]) // 2)
            else:
                r1 = 0
        if r1 > 0:
            size = info["size"] if info["size"] is not None else torch.ones(x.shape[0], x.shape[1], 1)
            x, info["size"] = reference_bsm(keys, x, size, r1, info["c"])
        x = x + mlp(layer_norm(x, sd, p + ".ln_2"), sd, p + ".mlp")
    cls_tokens = x.view(b, info["n_clip"], x.shape[1], -1)[:, :, : info["c"]].reshape(b, num_frames, -1)
    feats = layer_norm(cls_tokens, sd, "visual.ln_post") @ sd["visual.proj"]
    feats = feats / feats.norm(dim=-1, keepdim=True)
    if mask is None:
        mask = torch.ones(b, num_frames)
    mask = mask.float().unsqueeze(-1)
    denominator = mask.sum(1)
    denominator[denominator == 0] = 1.0
    return (feats * mask).sum(1) / denominator
