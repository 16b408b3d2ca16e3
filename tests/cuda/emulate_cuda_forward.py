#!/usr/bin/env python3
"""Host-side emulation of the CUDA Llama forward's index arithmetic (tests/cuda/exec_llama.cu).

No GPU was available where exec/cuda/*.cuh was written, so this script re-implements, in
float64 numpy, exactly the flat-buffer index formulas of its kernels (rope_kernel,
kv_store_kernel, attention_kernel's block decomposition), cuBLAS's column-major semantics for
the gemm(OP_T, OP_N, M=out, N=m, K=in, lda=in, ldb=in, ldc=out) call that linear() makes,
and the cudaMemcpy2DAsync that picks the last positions, and compares the logits with the
Transformers fixtures. A wrong transpose, stride or head mapping shows as an O(1) error.
With --bf16-activations it also rounds every matmul input to bfloat16 (linear_mode::
weight_type) on bf16-rounded weights, which is where exec_llama.cu's 3% bound comes from.

Run: /opt/stowage-tools-venv/bin/python tests/cuda/emulate_cuda_forward.py [--bf16-activations]
"""
import os
import json, base64, struct, sys, numpy as np
from safetensors.numpy import load_file
fx_dir=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "tiny") + "/"
def b64f(s):
    b=base64.b64decode(s); return np.frombuffer(b,dtype='<f4')
def sgemm_TN(M,N,K,A,lda,B,ldb,ldc):
    # C[i + j*ldc] = sum_k A[k + i*lda] * B[k + j*ldb]
    C=np.zeros(ldc*N,dtype=np.float64)
    for i in range(M):
        for j in range(N):
            C[i+j*ldc]=np.dot(A[i*lda:i*lda+K].astype(np.float64),B[j*ldb:j*ldb+K])
    return C
def linear(x,m,W,b=None):
    out,inn=W.shape
    y=sgemm_TN(out,m,inn,W.ravel(),inn,x,inn,out)
    if b is not None:
        for i in range(m*out): y[i]+=b[i%out]
    return y
def rms(x,rows,w,eps):
    d=len(w); y=np.empty_like(x)
    for r in range(rows):
        xr=x[r*d:(r+1)*d]; inv=1/np.sqrt((xr*xr).sum()/d+eps); y[r*d:(r+1)*d]=w*(xr*inv)
    return y
def inv_freq(cfg,hd):
    rp=cfg["rope_parameters"]; base=rp["rope_theta"]
    f=1.0/(base**(np.arange(0,hd,2)/hd))
    if rp["rope_type"]=="llama3":
        old=rp["original_max_position_embeddings"]; fac=rp["factor"]; lf=rp["low_freq_factor"]; hf=rp["high_freq_factor"]
        wl=2*np.pi/f; lw=old/lf; hw=old/hf
        v=np.where(wl>lw,f/fac,f); sm=(old/wl-lf)/(hf-lf); smoothed=(1-sm)*v/fac+sm*v
        med=~(wl<hw)&~(wl>lw); f=np.where(med,smoothed,v)
    return f
def rope(x,rows,seq,heads,half,cosv,sinv):
    total=rows*heads*half
    for k in range(total):
        i=k%half; rh=k//half; r=rh//heads; t=r%seq; base=rh*2*half
        c=cosv[t*half+i]; s=sinv[t*half+i]; a=x[base+i]; b=x[base+i+half]
        x[base+i]=a*c-b*s; x[base+i+half]=b*c+a*s
def kv_store(kn,vn,kc,vc,batch,seq,kvh,hd,cap,past):
    for k in range(batch*seq*kvh*hd):
        d=k%hd; h=(k//hd)%kvh; t=(k//(hd*kvh))%seq; b=k//(hd*kvh*seq)
        dst=((b*kvh+h)*cap+past+t)*hd+d; kc[dst]=kn[k]; vc[dst]=vn[k]
def attention(q,kc,vc,out,batch,seq,heads,kvh,hd,cap,past,window,scale):
    for blk in range(batch*seq*heads):
        h=blk%heads; bt=blk//heads; t=bt%seq; b=bt//seq; kh=h//(heads//kvh)
        qo=(bt*heads+h)*hd; K=kc[(b*kvh+kh)*cap*hd:]; V=vc[(b*kvh+kh)*cap*hd:]
        pos=past+t; first=max(pos-window+1,0) if window>0 else 0
        qs=q[qo:qo+hd]
        sc=np.array([qs@K[j*hd:(j+1)*hd] for j in range(first,pos+1)])*scale
        p=np.exp(sc-sc.max()); p/=p.sum()
        o=np.zeros(hd)
        for n,j in enumerate(range(first,pos+1)): o+=p[n]*V[j*hd:(j+1)*hd]
        out[qo:qo+hd]=o
def forward(W,cfg,ids,batch,cache,mode):
    hid=cfg["hidden_size"]; L=cfg["num_hidden_layers"]; H=cfg["num_attention_heads"]; KV=cfg["num_key_value_heads"]
    hd=cfg.get("head_dim",hid//H); inter=cfg["intermediate_size"]; eps=cfg["rms_norm_eps"]; V=cfg["vocab_size"]
    seq=len(ids)//batch; rows=batch*seq; past=cache["len"]; cap=cache["cap"]; half=hd//2
    window=cfg.get("sliding_window") or 0
    f=inv_freq(cfg,hd)
    cosv=np.concatenate([np.cos((past+t)*f) for t in range(seq)]); sinv=np.concatenate([np.sin((past+t)*f) for t in range(seq)])
    E=W["model.embed_tokens.weight"]
    x=np.concatenate([E[i] for i in ids]).astype(np.float64)
    qb=cfg["model_type"]=="qwen2"
    for li in range(L):
        p=f"model.layers.{li}."
        g=lambda n: W[p+n]
        h=rms(x,rows,g("input_layernorm.weight"),eps)
        q=linear(h,rows,g("self_attn.q_proj.weight"),g("self_attn.q_proj.bias") if qb else None)
        k=linear(h,rows,g("self_attn.k_proj.weight"),g("self_attn.k_proj.bias") if qb else None)
        v=linear(h,rows,g("self_attn.v_proj.weight"),g("self_attn.v_proj.bias") if qb else None)
        rope(q,rows,seq,H,half,cosv,sinv); rope(k,rows,seq,KV,half,cosv,sinv)
        kc=cache["k"][li]; vc=cache["v"][li]
        kv_store(k,v,kc,vc,batch,seq,KV,hd,cap,past)
        att=np.zeros(rows*H*hd)
        attention(q,kc,vc,att,batch,seq,H,KV,hd,cap,past,window,1/np.sqrt(hd))
        x+=linear(att,rows,g("self_attn.o_proj.weight"))
        h=rms(x,rows,g("post_attention_layernorm.weight"),eps)
        gg=linear(h,rows,g("mlp.gate_proj.weight")); uu=linear(h,rows,g("mlp.up_proj.weight"))
        gg=gg/(1+np.exp(-gg))*uu
        x+=linear(gg,rows,g("mlp.down_proj.weight"))
    cache["len"]+=seq
    if mode=="last":
        sel=np.zeros(batch*hid)
        # cudaMemcpy2DAsync: dst pitch hid, src = x + (seq-1)*hid, src pitch seq*hid, height batch
        for r in range(batch): sel[r*hid:(r+1)*hid]=x[(seq-1)*hid + r*seq*hid:(seq-1)*hid + r*seq*hid+hid]
        out_rows=batch
    else: sel=x; out_rows=rows
    sel=rms(sel,out_rows,W["model.norm.weight"],eps)
    head=W.get("lm_head.weight",E) if not cfg["tie_word_embeddings"] else E
    return linear(sel,out_rows,head)
def mkcache(cfg,batch,cap):
    L=cfg["num_hidden_layers"]; KV=cfg["num_key_value_heads"]; hd=cfg.get("head_dim",cfg["hidden_size"]//cfg["num_attention_heads"])
    return {"len":0,"cap":cap,"k":[np.zeros(batch*KV*cap*hd) for _ in range(L)],"v":[np.zeros(batch*KV*cap*hd) for _ in range(L)]}

def bf16(a):
    u = np.asarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16  # round to nearest even
    return r.astype(np.uint32).view(np.float32).astype(np.float64)


def main():
    global linear
    names = ["llama_gqa", "llama3_tied", "mistral", "qwen2"]
    if "--bf16-activations" in sys.argv:
        exact = linear
        linear = lambda x, m, W, b=None: exact(bf16(x), m, W, b)
        for name in names:
            fx = json.load(open(fx_dir + name + ".json"))
            d = fx_dir + fx["model_dir"]
            cfg = json.load(open(d + "/config.json"))
            W = {k: bf16(v) for k, v in load_file(d + "/model.safetensors").items()}
            exp = b64f(fx["logits_all_bf16_weights"]["f32le_b64"])
            got = forward(W, cfg, fx["prompt"], 1, mkcache(cfg, 1, 64), "all")
            err = np.abs(got - exp).max()
            print(f"{name}: max |diff| {err:.3g} = {err / np.abs(exp).max():.2%} of the largest logit")
        return
    for name in names:
        fx = json.load(open(fx_dir + name + ".json"))
        d = fx_dir + fx["model_dir"]
        cfg = json.load(open(d + "/config.json"))
        W = {k: v.astype(np.float64) for k, v in load_file(d + "/model.safetensors").items()}
        prompt = fx["prompt"]
        V = cfg["vocab_size"]
        exp = b64f(fx["logits_all"]["f32le_b64"])
        got = forward(W, cfg, prompt, 1, mkcache(cfg, 1, 64), "all")
        print(name, "all positions: max |diff|", np.abs(got - exp).max())
        c = mkcache(cfg, 1, 64)
        errs = [np.abs(forward(W, cfg, prompt[:3], 1, c, "last") - exp[2 * V:3 * V]).max()]
        for t in range(3, len(prompt)):
            got = forward(W, cfg, prompt[t:t + 1], 1, c, "last")
            errs.append(np.abs(got - exp[t * V:(t + 1) * V]).max())
        print(name, "prefill + decode: max |diff|", max(errs))
        flat = sum(fx["batch_prompts"], [])
        got = forward(W, cfg, flat, 2, mkcache(cfg, 2, 16), "last")
        print(name, "batch of 2: max |diff|", np.abs(got - b64f(fx["batch_last_logits"]["f32le_b64"])).max())


if __name__ == "__main__":
    main()
