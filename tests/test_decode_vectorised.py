"""The vectorised decode loop of HFStepProposer equals the old per-row Python loop token for token.

``RECORDED`` holds the outputs of the old loop (commit 802dcac's ``_decode``/``_advance``/``_finish``: one Python
iteration per row per token), produced before the loop was rewritten, with that loop's ``_generator``/``_sample``
patched to draw from the new counter-based sampler (``row_key``/``sample_tokens``) so both loops see the same noise
(the procedure is :func:`run_case` under the patch described in ``_OLD_LOOP_PATCH``). Every case covers a different
path: KV (Llama, Qwen2, GPT-2 with learned positions), Mamba's SSM state, the recompute fallback, greedy, top-p,
children split over admission groups, eviction, and rows cut at the model context. The new loop must give the same
token ids, flags and text, and the same log-probabilities (float64 models: up to 1e-9 summed over a case).

The other tests pin the pieces the loop is built from: the int64 hash equals a pure-Python splitmix64 (so the noise
is the same on every device), the sampler draws from the right distribution and never a zero-probability token, and
the delimiter automaton agrees with a plain substring search on random token sequences.
"""

from __future__ import annotations

import base64
import json
import random
import zlib

import numpy as np
import pytest
import torch
from test_hf_backend import PROMPTS, one_thread, tiny_gpt2  # noqa: F401 (one_thread: autouse fixture)

from thinktree.search import Trajectory
from thinktree.search.backends.cache import RecomputeAdapter
from thinktree.search.backends.hf import HFStepProposer, row_key, sample_tokens, uniforms
from thinktree.trainer.tiny import build_tiny_model

_OLD_LOOP_PATCH = """
HFStepProposer._generator = lambda self, seed, child: row_key(seed, child)
def _sample(self, logits, rows):
    keys = torch.tensor([r.gen for r in rows]); steps = torch.tensor([len(r.tokens) for r in rows])
    tok, lp = sample_tokens(logits, keys, steps, self.temperature, self.top_p)
    return tok.tolist(), lp.tolist()
HFStepProposer._sample = _sample
"""

CASES = {
    # name: (arch, proposer kwargs, prompts, depth, children)
    "llama_top_p": ("llama", dict(max_step_tokens=6, max_batch_size=7, step_delimiter="o", temperature=0.9,
                                  top_p=0.95), PROMPTS, 3, 3),
    "qwen2_wide": ("qwen2", dict(max_step_tokens=5, max_batch_size=64), PROMPTS, 3, 2),
    "mamba": ("mamba", dict(max_step_tokens=5, max_batch_size=5, step_delimiter="p"), PROMPTS, 2, 2),
    "gpt2_context": ("gpt2", dict(max_step_tokens=64, max_batch_size=4), ["9" * 28, "9" * 5, "x", "9" * 20], 1, 3),
    "recompute": ("recompute", dict(max_step_tokens=4, max_batch_size=5), PROMPTS[:2], 2, 2),
    "greedy": ("llama", dict(max_step_tokens=6, temperature=0), PROMPTS, 2, 2),
    "split_groups": ("llama", dict(max_step_tokens=4, max_batch_size=4, temperature=1.3, step_delimiter="3"),
                     PROMPTS, 2, 5),
    "two_char_delimiter": ("llama", dict(max_step_tokens=8, max_batch_size=6, temperature=0.2, step_delimiter="xx"),
                           PROMPTS, 3, 3),
    "eviction": ("llama", dict(max_step_tokens=5, cache_max_tokens=20), PROMPTS[:2], 3, 2),
}  # fmt: skip


def _model(arch: str):
    if arch == "gpt2":
        _, tok = build_tiny_model("llama", seed=1)
        return tiny_gpt2(n_positions=32).double().eval(), tok
    model, tok = build_tiny_model("llama" if arch == "recompute" else arch, seed=1)
    return model.double().eval(), tok


def run_case(name: str) -> list:
    """Grow a tree level by level (one propose call per level); every step as [token ids, eos, truncated, text,
    sum of logprobs]."""
    arch, kw, prompts, depth, children = CASES[name]
    model, tok = _model(arch)
    proposer = HFStepProposer(model, tok, **kw)
    if arch == "recompute":
        proposer.adapter = RecomputeAdapter(proposer._call, proposer.pad_id)
    frontier = [Trajectory(p, key=k) for k, p in enumerate(prompts)]
    out = []
    for level in range(depth):
        kids = proposer.propose(frontier, children, [7 * level + 3 * i + 1 for i in range(len(frontier))])
        for ss in kids:
            out += [[list(s.token_ids), s.eos, s.truncated, s.text, sum(s.logprobs)] for s in ss]
        frontier = [t.extend(s) for t, ss in zip(frontier, kids) for s in ss if not s.eos]
    return out


# per case: every step's [token ids, 2 * eos + truncated] and the case's sum of logprobs (zlib + base85 JSON)
_RECORDED_BLOB = (
    "c-o~}+m01E68x8b_O^V#@GA(l7-+FbK=(Awva1pQz8T@NGwYm#R;v+)IpeBw*?EbK%&foezI=KA_5H)^)APgg-"
    "J8GezP~;`f4_V4_U+p~T<I=V*ULNS-?_JMM{zy5SX^zcM%QIBU_NB$U5hSf*M`gCn6B9k@9Mx4LFUK0-"
    "Q%{}UGKQm;xQkSOVJg1#Jf=4*z?)RrBPiOt`)iAnD5O6@A)?mELQt*Wi*#$60b?w<@G=cuHitDOVzdhh)(9BllL_5imri`MG8^&-"
    "sI{!mMe0w;Ic?S-"
    "nwp2F3bMAg8*DuHy06~YYiL3YOSul%P9kdm@8fy)>{M4pXJ7Y>v^p%lc_+Ocy)AMB^DaaBHL;5+bBfDA;OeX$#YwQvXRuFRj9GMus7db"
    "kr{c(fE41I&)5PqRSKS3icLx6*hOY?(CC(0#Q<P30gK4cm&#EJkJ_<M6?;84DLX9k?0Toi9_6M;IjvRXByvL8gOispX(gUh>`7L~JJM2"
    "7!H%Ks0eOn#RZDVzfZ2%=<gKNG$6+-hUNM-W1|y0SNy%YFwOf0+K<FMqlb7f9S~-YFxK33=^Xs(*+iV$@A@Yey4O`5-"
    "<CP(+&4`dhvQb2gwN)EU?i|y@AjoJ0-)LlVs-Z%VyJRb}a}jP(uZ-Lp?AOCQ#yV4^U%+D$|J{~4V58#tOC=%^S$9w<A?Y@Hgn_EUxDuq"
    "Cu;KlFIjKlOu%QQ<=Q4-"
    "VV9R0@z?ZIQA^s}!dAe8Aec^bbO<s~$$BhbDI81R1YAjU>aELfNU}ZXnTA`>6&p=X3)S+O{Jp<KnY1=Z40Cx%?$nV&e!QoA(;|qp~;N%"
    "ZnAsHD{tyo_cH%~{HtNdut*E$MJ2-pXm8{h-5HjD|NYjtrn_!P8_({6=FEKw_r2j{QG>7k-Q0dMROJ;-"
    "M8ucy6QbnduQ){x~l)O471*`nQUT;Z>UV+*Aa_T>_tGi?|v5Q`{UCWpCQge+2R^bRO=Ej<7`a@s~mu0j2V_yXGu*6RyEO*KP#3XqCOXg"
    "=$4c%9v?#Gn8}Z45|D_8vzN2Y{!`)5}UD5stzXH{FQP)om!(fn#Gkd8wg7#&n4Y`|ex$9T*cBI_03MpFv%AicBQ7rX%AHq7sy?%0vuru"
    "w$>f6w?vq06iNX$WifB%(C-{j6ln>jQGT!u`dP?nAtjNM{sR)M-"
    "kk1cUh7;5vdnrO?4isz{jj+Xuk*nL8Cc*FdsHduh&x)=nU>7;#=MX6HUa<2C**r7cdRH5po+!3dEWQuFPPz#S8}<kUi|FD3s?JS~H`l*"
    "QiCVgK0WLsK)s!V<!PD42@8L#yA5&tg6Kt4;BQy>)jSx8l!+1PCyW<UhO~eF&QH5tnz3Ko>1yg|Cf73Y?0)Fq+@Nl0hdL!gS=<XzjJqA"
    "o<2RlJpJ+T{m0k4H~)yEmit~(3o+*2d;I0@{`~p)Ek6AG{PFRENp|1~nWSjagklPZWO5y}f<rVS)<*O|43^uvVPUv|*d-"
    "3R`9NoclmRzx>YAjnVz0_QV61U+*&Rl~83se{P-ZxzS1|Gs+&`$B{4l&N03WO2m64tx_YR=dx-k*82i~5VvE<FaHu)f#5-"
    "%xP15;y=m78J0>qSB!MR0RReJJ$6P9{Gt+max}Mwlp@=`zO1mgHm`4IAxWW)ci!S$V{Q2$W$1VhoE92aT%0l|u7c=tn&dy5=Uk!j}^LQ"
    "SRNGD==`>GDF|GvjJ9ln;tt8ojWHtY>LMNmB?_?Mhcm6brJvrR~@*5K-JXz1|1nOE~-"
    "C>tH{m4>=Kw0;HZcX#XL@`)QcJ_G`6C0HTqs5u_ELNK)~{%396YvwP+etf{Cd4rc;g*?_+GEMPFMPK8RC(egE~3_ZR-"
    "i9YPvjf$fN%b&hp*=2e||yiZgPMYN>AHAtM-I8Rne-7h_cV{GNhUc$kE&6_>^q0)b%$(rW*#kiBnjm)rl)Wuw6#v-~DWo&zaxm9?+*g-"
    "y@W<I_n*&(%KY>IZAZ2q{0$(ZhQ^0C+KTW-FIMm{~i#)l72-"
    "(Da8{dx_Q4A*;o*~WpAT{q06I$Nvr@JrwgF+;#sWY;H4Wav$ht@xUVea!U4BQ~a)l8_2j<^>_0L6>+DNlOPk0K_UW4UhN%z~UQVDT`H!"
    "9nF)3PD~8W5MabeM$f<-"
    "XW0NjFC+dYqJ{uhU_6B+1gSH*5a=+1SR{~aa<U`ADi1KBtT?}*2%I(ndl38?;^pzm{4JBK!HPKvD4LloxKdI=(Z`A^kyQrD3Ta6uL^2j"
    "kW<O@~;hA5jnK@9}gW_O*$rL<svj+Z=X&%W}=7LCvC;%2ACMJ@d0e}PcnDCZ@=tnsXH={^n{UlTJX(-"
    "ywq=2=XjJSuuRzS7nN9!ixogT{@%hWeA80-"
    "o0A!wT3c%lwli_9cIVnJr$W92q&2tMZfo`o``(PK*D4lj=%p1wZ+c)dXy21$c~lb%k#Fe^;WV2P-BaRogRWwGPxjQvF?8UvVt-"
    "&x$rUfCdG{$%*g0!$i8A5i3~vle5jFiny31~vo{MF=Iw5lb$e;PCSJ`0+nyQOr1L#wmVY&+pi>>UJk^zQX6Lc>u-"
    "w^LM8%_wsl5_J7S^i9GpnKZLZ7(A(%CSCRPl=P#dMA3nW2{eZY{!109%vQSt}rGVg@H6oDrbc5jmYg9E-"
    "(D`u7Y^$1WBswG74U@Fhl?N>1HsI;ILS&%uiV?>X*qDq4M+{*4nzd%we=zjcI*~U{wEnM7nCe;$iUjzq0cH5<QC>H<8Mk%3gxiMZul-a"
    "Kk>7Q4wyycJ;21W$sVj<L7`uGR6g#2Py4Gd(%X+GkN#tBjb&V`H<H2m|b)s%mcH)W6BcqRs6f;BK>wx!7@kC8IBPmcfN-"
    "0d|k|}!u+rf4;Uz^c5n7a5XlM-`b_d#<49M4o_P_}3@OE_0xgT56fOef=QG(y>K)4U=T`(mU#MYB-"
    "c>YWygk><{kRrsC7|7{4#uR887vd2}y?aJXv9@W^H)MisMiLC9)bK9?k2Ef^nu<NTbW7N(BGUK^dLFaamp`;mfnZ?wm6>x-UZ?KrT-"
    "^eF)ZfrsrqE=X4*>(4NMC)yZ4C_q2)?PYOp{&j+zC0O>4eqQ-"
    "?xF(;10)d?q`(<a)6>mGl9+7_oiqz+zbWBycbliMsK!7a4EK&in5^(unb~U%ifx@_iXWY{ZW!scb`bl}OnHC;+^K6OS!CHo^-"
    "aqvCO_@WlDdilaoaRx0&BO(MYHC2jhfj$9A?VzwT9Z6jcCPIPCz>fw@FS-"
    "{eDOy*76uRw~FG(>(8f$5C44s^6>HT%jd73Umsttg3UR@IOQ3Gsig?fju4cr6D#c4g*l}9H^xrpDy#96?a2@#sWo}WGS$%<XmhCWBTK%"
    "w_nX<+7)J|YKD)geM;VS(n&rn+5mJo3kdmA2Zosv<BB;GH?Y$8;*A6;D)EFxxF|GzCwPNg9lj}J|sS_Vs+pWNzvWBobj{Lg~np}L3hDM"
    "+AOOzEka=dli^Rv5L$!c(-"
    "r=wVySRb#7KZWGPp0t=+@EoF7K6QGwvyhgD4wU~*waku5L6W)XFRgF~)ny>35z}w4+Sgv#{cIsB!f}$yX2Y|ciU+3${Y>yrYQ>8j!%{O"
    "?n^@aL&e?VBSU<gDt7{xNpr(Wq4ELxe+d3Yhaf9B_yLLJ`uObsXiQ{yYwM6tE>NLo89Oj5^?j>?~#q@TP1R5=h<%!`HJ*qP0PO8(?<>v"
    "9Lv8a8V!oJdM3U$_Thw(^ZYx|Md4;a^w!3yf!^r63~mryj|W`XLBEw{7N)NmfzbYVclxMDxX+K^+!AN?=}47Fbg>$7uYhCw?EFQz416p"
    "HfZGu0p=*z<YpO4M+dBN*f!God})8Olzk4aqiUD#z6x<}f@ZF$?cU19)iVnw5_eaGAF<`<+I~G3GGq)@xTbF}7b0t;sSw>imNQ$Iz+?L"
    ")o9kHlxI@;-$WW>0_M-YS?O@XeZUfmSQ<&_hl`H4ou(U68C=>#ikt&Lcs*&UA0f7<8xeF(+1u-"
    "&rZwEj<yTl6me*Fr<Yp}?SRJ}nK_hg?P21Iq24s2%#xQl1ILYL_sH=QX~pfruz~RO1;JzyvyP0)kx58yjT-"
    "{l?S4(XG%g|#dL8xLJ77CA5E+xYhF)E(gf@|L2bxp3IZt9(=Rr@b@e2(W%O*;1?tOgxGC$HldTu&LM^v4i+hub%-"
    "nn);AwG}W#yRiJ*&wzdL#%PLb`f!D#1jWNqReb?t_~^~u|K|*0QM4Njj%NcZIZ%5ZY*lU$(SPgor_*xoAIp5=6o8vH3S=5p%vZBV<_TU"
    "$3cBNYkD-;T-yVi%;&hBbVO4u8LXHm_5x-"
    "*1Z55*Z<LppUm*L=de}71TS6<_1_<_y4`|A#{)I?k8V2l^z70=EdbKWxPyG_ePjo6S#&CHNwQB6hHbY3qmxL}=9NVIoGw#%LfMuq_C~p"
    "<7rZu_5m<>q!;Ot6Xm*a{gN+G7w!zjM?QY2A&{MY9Xub-d3{k9x@vm$JI$XXOOJ>+0|$k$b^(?=vnbyx#p-"
    "38)PXZR=)8=C5OmDqfaK+kO4VmN)bHyKR3Q7$$`g!aF>xXFAqMo@32H`HeTpwWUhCCOp6aihEbEG(FBsra#uZR3{X<CAX4QDQMoESx^9"
    "C5OfYq?_VcV#nq1cCQ4oQmxs1v;=SGDTnz)Y}BhZZll}va&F`1)y6HyS3_5pSF^tlC8sf}_fh`y>(_q)zsI&-"
)
RECORDED = json.loads(zlib.decompress(base64.b85decode("".join(_RECORDED_BLOB))))


@pytest.mark.parametrize("name", sorted(CASES))
def test_vectorised_loop_equals_old_loop(name):
    got, want = run_case(name), RECORDED[name]
    assert [[g[0], 2 * g[1] + g[2]] for g in got] == want["steps"]
    assert abs(sum(g[4] for g in got) - want["logprob_sum"]) < 1e-9


def test_recorded_cases_cover_every_way_a_step_ends():
    steps = [s for case in RECORDED.values() for s in case["steps"]]
    assert {flag for _, flag in steps} == {0, 1, 2}  # delimiter, truncated, EOS
    assert len({len(t) for t, _ in RECORDED["gpt2_context"]["steps"]}) > 2  # rows cut at the context end


def _splitmix_reference(key: int, step: int) -> float:
    """Pure-Python splitmix64 (mod 2**64) of the same construction as ``uniforms``."""
    m = (1 << 64) - 1

    def mix(x: int) -> int:
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
        return x ^ (x >> 31)

    x = mix((mix(key & m) + (step + 1) * 0x9E3779B97F4A7C15) & m)
    return (x >> 11) * 2.0**-53


def test_uniforms_equal_pure_python_splitmix():
    rng = random.Random(0)
    seeds = [0, 1, 2**62, 2**63 - 1, *(rng.getrandbits(63) for _ in range(20))]
    keys = [row_key(s, c) for s in seeds for c in (0, 1, 7)]
    steps = [rng.randrange(0, 1 << 20) for _ in keys]
    got = uniforms(torch.tensor(keys), torch.tensor(steps)).tolist()
    assert got == [_splitmix_reference(k, n) for k, n in zip(keys, steps)]
    assert len(set(got)) == len(got) and all(0 <= u < 1 for u in got)


def test_sampler_distribution_and_support():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 700, generator=gen, dtype=torch.float64) * 2
    n = 40_000
    keys = torch.full((n,), row_key(11, 2))
    tok, lp = sample_tokens(logits.expand(n, -1), keys, torch.arange(n), 1.0, 1.0)
    freq = torch.bincount(tok, minlength=700).double() / n
    probs = torch.softmax(logits[0], -1)
    assert (freq - probs).abs().max() < 5 * (probs.max() / n) ** 0.5  # ~5 sigma
    assert torch.allclose(lp, torch.log_softmax(logits, -1)[0, tok], atol=1e-12)
    # a nucleus of three tokens (others masked to -inf), zero-weight tokens never drawn, temperature sharpening
    masked = torch.full((n, 700), float("-inf"), dtype=torch.float64)
    masked[:, [3, 256, 699]] = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    tok, _ = sample_tokens(masked, keys, torch.arange(n), 0.5, 1.0)
    counts = torch.bincount(tok, minlength=700)
    assert set(torch.nonzero(counts).squeeze(1).tolist()) == {3, 256, 699}
    assert counts[699] > counts[256] > counts[3]
    same, _ = sample_tokens(masked[:1], keys[5:6], torch.tensor([5]), 0.5, 1.0)
    assert same.item() == tok[5].item()  # a row's token does not depend on the batch


def test_delimiter_automaton_matches_substring_search():
    _, tok = build_tiny_model("llama")
    rng = np.random.default_rng(0)
    for delim in ("\n", "\n\n", "ab", "aab", "<end>"):
        model, _ = build_tiny_model("llama")
        proposer = HFStepProposer(model, tok, step_delimiter=delim)
        done, nxt = proposer._delim_done.cpu(), proposer._delim_next.cpu()
        alphabet = tok(delim + "xb<e", add_special_tokens=False)["input_ids"] + [0, 2]
        for _ in range(300):
            seq = rng.choice(alphabet, size=12).tolist()
            state, text = 0, ""
            for t in seq:
                text += proposer._tok_str[t]
                hit = bool(done[state, t])
                assert hit == (delim in text), (delim, seq)
                if hit:
                    break
                state = int(nxt[state, t])
