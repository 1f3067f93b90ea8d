//! Attention, the transformer block and the spatial transformer (diffusers
//! `models/attention_processor.py`, `models/attention.py`, `models/transformers/transformer_2d.py`).

use crate::visit::{Norm, Projection, VisitProjections};
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use imprint_ops::{
    checkpoint, scaled_dot_product_attention, BlockFn, Checkpointing, Conv2d, Conv2dConfig,
    GroupNorm, LayerNorm, Linear,
};
use std::sync::Arc;

/// The text states each cross-attention layer attends to: the first hook of DESIGN.md.
///
/// `Shared` is ordinary conditioning; `PerLayer` gives every cross-attention layer its own states
/// (Extended Textual Inversion / P+), indexed in the UNet's forward order.
#[derive(Clone, Copy, Debug)]
pub enum TextConditioning<'a> {
    Shared(&'a Tensor),
    PerLayer(&'a [Tensor]),
}

impl<'a> TextConditioning<'a> {
    pub fn for_layer(&self, index: usize) -> Result<&'a Tensor> {
        match *self {
            TextConditioning::Shared(t) => Ok(t),
            TextConditioning::PerLayer(ts) => ts.get(index).ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "per-layer conditioning has {} entries, cross-attention layer {index} needs one",
                    ts.len()
                ))
            }),
        }
    }
}

/// Owned text states, what a prompt encodes to: the value behind a [`TextConditioning`].
///
/// Batches are concatenated per layer ([`TextStates::cat`]); a per-layer value with one distinct
/// tensor never arises from [`TextStates::per_layer`], which folds it to `Shared`.
#[derive(Clone, Debug)]
pub enum TextStates {
    Shared(Tensor),
    PerLayer(Vec<Tensor>),
}

impl TextStates {
    /// States per cross-attention layer; identical entries (the same tensor) fold to `Shared`.
    pub fn per_layer(layers: Vec<Tensor>) -> Self {
        match layers.first() {
            Some(first) if layers.iter().all(|t| t.id() == first.id()) => {
                Self::Shared(first.clone())
            }
            _ => Self::PerLayer(layers),
        }
    }

    pub fn conditioning(&self) -> TextConditioning<'_> {
        match self {
            Self::Shared(t) => TextConditioning::Shared(t),
            Self::PerLayer(ts) => TextConditioning::PerLayer(ts),
        }
    }

    /// The states of layer `index` (any index for shared states).
    pub fn layer(&self, index: usize) -> Result<&Tensor> {
        self.conditioning().for_layer(index)
    }

    /// Concatenates along the batch dimension, layer by layer when any part is per-layer
    /// (`[uncond; cond]` under classifier-free guidance).
    pub fn cat(parts: &[&TextStates]) -> Result<TextStates> {
        let layers = parts.iter().find_map(|p| match p {
            Self::PerLayer(ts) => Some(ts.len()),
            Self::Shared(_) => None,
        });
        match layers {
            None => {
                let ts: Vec<&Tensor> = parts.iter().map(|p| p.layer(0)).collect::<Result<_>>()?;
                Ok(Self::Shared(Tensor::cat(&ts, 0)?))
            }
            Some(n) => {
                let mut out = Vec::with_capacity(n);
                for i in 0..n {
                    let ts: Vec<&Tensor> =
                        parts.iter().map(|p| p.layer(i)).collect::<Result<_>>()?;
                    out.push(Tensor::cat(&ts, 0)?);
                }
                Ok(Self::PerLayer(out))
            }
        }
    }

    pub fn detach(&self) -> TextStates {
        match self {
            Self::Shared(t) => Self::Shared(t.detach()),
            Self::PerLayer(ts) => Self::PerLayer(ts.iter().map(Tensor::detach).collect()),
        }
    }
}

/// IP-Adapter's decoupled cross-attention (Ye et al. 2023; diffusers' `IPAdapterAttnProcessor`):
/// the last `num_tokens` states of the context are image-prompt tokens, attended to with their own
/// key and value projections; `Attn(Q, K_txt, V_txt) + scale · Attn(Q, K_ip, V_ip)` goes through
/// the shared output projection.
#[derive(Clone, Debug)]
pub struct ImagePromptAttention {
    pub to_k_ip: Linear,
    pub to_v_ip: Linear,
    pub scale: f64,
    pub num_tokens: usize,
}

/// Regional prompting by attention masking: outside its region, a word's tokens are hidden from
/// the pixels' cross-attention (the softmax runs over the other tokens). CLIP's text encoder is
/// causal, so the states after the word (the rest of the prompt, the end and padding tokens) still
/// carry some of it: the masking confines the word's own tokens, which is most but not all of its
/// effect. Exact (no change at all) where every query lies inside its regions.
#[derive(Clone, Debug)]
pub struct RegionMask {
    /// Key positions (token indices in the prompt) of the word.
    pub tokens: Vec<usize>,
    /// The region at latent resolution, `[h, w]`, 1 inside and 0 outside.
    pub mask: Tensor,
    /// Rows of the batch whose prompt names the word (the conditional half under guidance).
    pub rows: Vec<usize>,
}

impl RegionMask {
    /// Whether each of a layer's `sq` query positions lies inside the region: the latent mask
    /// average-pooled to the layer's resolution, inside where at least half is.
    fn inside(&self, sq: usize) -> Result<Vec<bool>> {
        let (h, w) = self.mask.dims2()?;
        let mut f = 1;
        while (h / f) * (w / f) > sq && f <= h.max(w) {
            f *= 2;
        }
        if (h / f) * (w / f) != sq || h % f != 0 || w % f != 0 {
            candle_core::bail!(
                "region mask of {h}×{w} latents does not match an attention layer of {sq} positions"
            )
        }
        let (hs, ws) = (h / f, w / f);
        let pooled = self
            .mask
            .reshape((hs, f, ws, f))?
            .mean(3)?
            .mean(1)?
            .flatten_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?;
        Ok(pooled.iter().map(|&v| v >= 0.5).collect())
    }
}

/// SVDiff's unmix regularizer (Han et al. 2023, §3.3), observed during a training forward: for
/// each region, the attention probabilities of its word's tokens at the queries *outside* the
/// region (where the other subject of a cut-mix image lies), squared and averaged over heads,
/// those queries and the tokens. The paper regularizes each subject's special token; here a
/// region holds every token of the subject's phrase (rare word and class word: "sks dog"), since
/// the class word names the subject too and would otherwise carry it across. Every
/// cross-attention layer shares one probe; the trainer sets the batch's regions before the
/// forward and takes the per-layer penalties after it.
#[derive(Debug, Default)]
pub struct UnmixProbe {
    regions: std::sync::Mutex<Vec<RegionMask>>,
    penalties: std::sync::Mutex<Vec<Tensor>>,
}

impl UnmixProbe {
    /// The regions of the next forward (each with the batch rows it applies to).
    pub fn set_regions(&self, regions: Vec<RegionMask>) {
        *self.regions.lock().unwrap_or_else(|e| e.into_inner()) = regions;
        self.penalties
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// The penalties of the layers since [`Self::set_regions`]; clears the regions, so later
    /// forwards (validation, recomputation) observe nothing.
    pub fn take_penalties(&self) -> Vec<Tensor> {
        self.regions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        std::mem::take(&mut *self.penalties.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// `q [B·H, Sq, d]`, `k [B·H, Sk, d]` of one cross-attention layer.
    fn observe(&self, q: &Tensor, k: &Tensor, heads: usize, scale: f64) -> Result<()> {
        let regions = self
            .regions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if regions.is_empty() {
            return Ok(());
        }
        let (_, sq, _) = q.dims3()?;
        let sk = k.dim(1)?;
        let mut found = vec![];
        for r in &regions {
            let outside: Vec<f32> = r
                .inside(sq)?
                .iter()
                .map(|&i| if i { 0.0 } else { 1.0 })
                .collect();
            let n_out = outside.iter().sum::<f32>();
            let tokens: Vec<u32> = r
                .tokens
                .iter()
                .filter(|&&t| t < sk)
                .map(|&t| t as u32)
                .collect();
            if n_out == 0.0 || tokens.is_empty() {
                continue;
            }
            let outside = Tensor::from_vec(outside, (1, sq, 1), q.device())?.to_dtype(q.dtype())?;
            let ids = Tensor::new(tokens.as_slice(), q.device())?;
            for &row in &r.rows {
                let (qr, kr) = (
                    q.narrow(0, row * heads, heads)?,
                    k.narrow(0, row * heads, heads)?,
                );
                // candle_nn's softmax is built from differentiable primitives (imprint's fused
                // one records no backward).
                let probs = candle_nn::ops::softmax(
                    &(qr.matmul(&kr.t()?)? * scale)?,
                    candle_core::D::Minus1,
                )?;
                let p = probs.index_select(&ids, 2)?;
                let penalty = (p.sqr()?.broadcast_mul(&outside)?.sum_all()?
                    / (heads as f64 * n_out as f64 * tokens.len() as f64))?;
                // In f32 whatever the activations' dtype: it joins the f32 loss.
                found.push(penalty.to_dtype(candle_core::DType::F32)?);
            }
        }
        self.penalties
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(found);
        Ok(())
    }
}

/// Multi-head attention `Attention` with `to_q`, `to_k`, `to_v`, `to_out.0`.
#[derive(Clone)]
pub struct Attention {
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Linear,
    heads: usize,
    dim_head: usize,
    /// An IP-Adapter on this cross-attention layer.
    pub image_prompt: Option<ImagePromptAttention>,
    /// Regional prompting on this cross-attention layer.
    pub regions: Vec<RegionMask>,
    /// SVDiff's unmix regularizer, when training with cut-mix samples.
    pub unmix: Option<Arc<UnmixProbe>>,
}

impl Attention {
    /// `cross_dim` is the key/value input size (the text states' width for cross-attention).
    pub fn new(
        vb: VarBuilder,
        query_dim: usize,
        cross_dim: usize,
        heads: usize,
        dim_head: usize,
        qkv_bias: bool,
    ) -> Result<Self> {
        let inner = heads * dim_head;
        Ok(Self {
            to_q: Linear::new(vb.pp("to_q"), query_dim, inner, qkv_bias)?,
            to_k: Linear::new(vb.pp("to_k"), cross_dim, inner, qkv_bias)?,
            to_v: Linear::new(vb.pp("to_v"), cross_dim, inner, qkv_bias)?,
            to_out: Linear::new(vb.pp("to_out.0"), inner, query_dim, true)?,
            heads,
            dim_head,
            image_prompt: None,
            regions: vec![],
            unmix: None,
        })
    }

    /// The width of the attention (`heads · dim_head`), what IP-Adapter's projections map to.
    pub fn inner_dim(&self) -> usize {
        self.heads * self.dim_head
    }

    /// `x [B, S, query_dim]`, `context [B, S_kv, cross_dim]` (or `x` itself for self-attention).
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let cross = context.is_some();
        // Mixed precision: f32 text states (a text encoder kept in f32) meet half activations.
        let context = context.map(|c| imprint_ops::cast_like(c, x)).transpose()?;
        let context = context.as_ref();
        let (context, image) = match (context, &self.image_prompt) {
            (Some(c), Some(ip)) => {
                let s = c.dim(1)?;
                if s <= ip.num_tokens {
                    candle_core::bail!(
                        "cross-attention with an IP-Adapter: the context has {s} states, fewer than the text plus {} image tokens",
                        ip.num_tokens
                    )
                }
                let text = c.narrow(1, 0, s - ip.num_tokens)?;
                (
                    text,
                    Some((c.narrow(1, s - ip.num_tokens, ip.num_tokens)?, ip)),
                )
            }
            (Some(c), None) => (c.clone(), None),
            (None, _) => (x.clone(), None),
        };
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(&context)?;
        let v = self.to_v.forward(&context)?;
        let (b, s, _) = q.dims3()?;
        let split = |t: Tensor| -> Result<Tensor> {
            let (b, s, _) = t.dims3()?;
            t.reshape((b, s, self.heads, self.dim_head))?
                .transpose(1, 2)?
                .reshape((b * self.heads, s, self.dim_head))
        };
        let merge = |o: Tensor| -> Result<Tensor> {
            o.reshape((b, self.heads, s, self.dim_head))?
                .transpose(1, 2)?
                .reshape((b, s, self.heads * self.dim_head))
        };
        let scale = (self.dim_head as f64).powf(-0.5);
        let q = split(q)?;
        let (k, v) = (split(k)?.contiguous()?, split(v)?.contiguous()?);
        if let (Some(probe), true) = (&self.unmix, cross) {
            probe.observe(&q, &k, self.heads, scale)?;
        }
        let o = if self.regions.is_empty() || !cross {
            scaled_dot_product_attention(&q, &k, &v, scale, None)?
        } else {
            self.regional_attention(&q, &k, &v, b, scale)?
        };
        let mut o = merge(o)?;
        if let Some((tokens, ip)) = image {
            // A scale of 0 leaves the layer exactly as without the adapter.
            if ip.scale != 0.0 {
                let k = split(ip.to_k_ip.forward(&tokens)?)?.contiguous()?;
                let v = split(ip.to_v_ip.forward(&tokens)?)?.contiguous()?;
                let o_ip = merge(scaled_dot_product_attention(&q, &k, &v, scale, None)?)?;
                o = (o + (o_ip * ip.scale)?)?;
            }
        }
        self.to_out.forward(&o)
    }
}

impl Attention {
    /// Attention with each batch row's regional masks as an additive `[Sq, Sk]` bias (−∞ where a
    /// query outside a region meets that region's word).
    fn regional_attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        b: usize,
        scale: f64,
    ) -> Result<Tensor> {
        let (_, sq, _) = q.dims3()?;
        let sk = k.dim(1)?;
        let h = self.heads;
        let mut rows = Vec::with_capacity(b);
        for row in 0..b {
            let (qr, kr, vr) = (
                q.narrow(0, row * h, h)?,
                k.narrow(0, row * h, h)?,
                v.narrow(0, row * h, h)?,
            );
            let here: Vec<&RegionMask> = self
                .regions
                .iter()
                .filter(|r| r.rows.contains(&row))
                .collect();
            if here.is_empty() {
                rows.push(scaled_dot_product_attention(&qr, &kr, &vr, scale, None)?);
                continue;
            }
            let mut bias = vec![0f32; sq * sk];
            for r in here {
                let inside = r.inside(sq)?;
                for (qi, &ins) in inside.iter().enumerate() {
                    if !ins {
                        for &t in r.tokens.iter().filter(|&&t| t < sk) {
                            bias[qi * sk + t] = f32::NEG_INFINITY;
                        }
                    }
                }
            }
            if bias.iter().all(|&v| v == 0.0) {
                // Every query inside its regions: plain attention, bit for bit.
                rows.push(scaled_dot_product_attention(&qr, &kr, &vr, scale, None)?);
                continue;
            }
            let bias = Tensor::from_vec(bias, (sq, sk), q.device())?;
            rows.push(scaled_dot_product_attention(
                &qr,
                &kr,
                &vr,
                scale,
                Some(&bias),
            )?);
        }
        Tensor::cat(&rows, 0)
    }
}

impl VisitProjections for Attention {
    fn visit_projections(&mut self, f: &mut dyn FnMut(Projection<'_>)) {
        for l in [
            &mut self.to_q,
            &mut self.to_k,
            &mut self.to_v,
            &mut self.to_out,
        ] {
            f(Projection::Linear(l));
        }
    }
}

/// `FeedForward` with GEGLU: `net.0.proj` to twice the inner width, `h · gelu(gate)`, `net.2`.
#[derive(Clone)]
pub struct FeedForward {
    pub proj_in: Linear,
    pub proj_out: Linear,
}

impl FeedForward {
    pub fn new(vb: VarBuilder, dim: usize, mult: usize) -> Result<Self> {
        let inner = dim * mult;
        Ok(Self {
            proj_in: Linear::new(vb.pp("net.0.proj"), dim, inner * 2, true)?,
            proj_out: Linear::new(vb.pp("net.2"), inner, dim, true)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.proj_in.forward(x)?;
        self.proj_out.forward(&imprint_ops::geglu(&h)?)
    }
}

impl VisitProjections for FeedForward {
    fn visit_projections(&mut self, f: &mut dyn FnMut(Projection<'_>)) {
        f(Projection::Linear(&mut self.proj_in));
        f(Projection::Linear(&mut self.proj_out));
    }
}

/// `BasicTransformerBlock`: self-attention, cross-attention to the text, GEGLU feed-forward, each
/// pre-normed with a residual.
#[derive(Clone)]
pub struct BasicTransformerBlock {
    pub norm1: LayerNorm,
    pub attn1: Attention,
    pub norm2: LayerNorm,
    pub attn2: Attention,
    pub norm3: LayerNorm,
    pub ff: FeedForward,
    /// This block's cross-attention index in the UNet's forward order (for per-layer conditioning).
    pub cross_attention_index: usize,
}

impl BasicTransformerBlock {
    pub fn new(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        dim_head: usize,
        cross_dim: usize,
        cross_attention_index: usize,
    ) -> Result<Self> {
        Ok(Self {
            norm1: LayerNorm::new(vb.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::new(vb.pp("attn1"), dim, dim, heads, dim_head, false)?,
            norm2: LayerNorm::new(vb.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::new(vb.pp("attn2"), dim, cross_dim, heads, dim_head, false)?,
            norm3: LayerNorm::new(vb.pp("norm3"), dim, 1e-5)?,
            ff: FeedForward::new(vb.pp("ff"), dim, 4)?,
            cross_attention_index,
        })
    }

    pub fn forward(&self, x: &Tensor, cond: TextConditioning) -> Result<Tensor> {
        let x = (self.attn1.forward(&self.norm1.forward(x)?, None)? + x)?;
        let context = cond.for_layer(self.cross_attention_index)?;
        let x = (self
            .attn2
            .forward(&self.norm2.forward(&x)?, Some(context))?
            + x)?;
        self.ff.forward(&self.norm3.forward(&x)?)? + x
    }
}

impl VisitProjections for BasicTransformerBlock {
    fn visit_projections(&mut self, f: &mut dyn FnMut(Projection<'_>)) {
        self.attn1.visit_projections(f);
        self.attn2.visit_projections(f);
        self.ff.visit_projections(f);
    }
    fn visit_norms(&mut self, f: &mut dyn FnMut(Norm<'_>)) {
        f(Norm::Layer(&mut self.norm1));
        f(Norm::Layer(&mut self.norm2));
        f(Norm::Layer(&mut self.norm3));
    }
}

/// `proj_in` / `proj_out` of the spatial transformer: 1×1 conv, or linear with
/// `use_linear_projection` (SD 2.x).
#[derive(Clone)]
pub enum SpatialProjection {
    Conv(Conv2d),
    Linear(Linear),
}

impl SpatialProjection {
    fn new(vb: VarBuilder, in_c: usize, out_c: usize, linear: bool) -> Result<Self> {
        Ok(if linear {
            Self::Linear(Linear::new(vb, in_c, out_c, true)?)
        } else {
            Self::Conv(Conv2d::new(vb, in_c, out_c, 1, Conv2dConfig::default())?)
        })
    }

    fn visit(&mut self, f: &mut dyn FnMut(Projection<'_>)) {
        match self {
            Self::Conv(c) => f(Projection::Conv2d(c)),
            Self::Linear(l) => f(Projection::Linear(l)),
        }
    }
}

/// `Transformer2DModel` for image latents: group norm, projection in, transformer blocks,
/// projection out, residual.
#[derive(Clone)]
pub struct Transformer2DModel {
    pub norm: GroupNorm,
    pub proj_in: SpatialProjection,
    pub transformer_blocks: Vec<BasicTransformerBlock>,
    pub proj_out: SpatialProjection,
    /// Recompute this block in the backward pass instead of keeping its activations (with
    /// shared conditioning).
    pub checkpointing: Option<Checkpointing>,
}

pub struct Transformer2DConfig {
    pub channels: usize,
    pub heads: usize,
    pub depth: usize,
    pub cross_attention_dim: usize,
    pub norm_num_groups: usize,
    pub use_linear_projection: bool,
}

impl Transformer2DModel {
    /// `first_cross_attention_index` numbers this model's blocks for per-layer conditioning.
    pub fn new(
        vb: VarBuilder,
        c: &Transformer2DConfig,
        first_cross_attention_index: usize,
    ) -> Result<Self> {
        if c.channels % c.heads != 0 {
            candle_core::bail!(
                "{}: {} channels are not divisible into {} heads",
                vb.prefix(),
                c.channels,
                c.heads
            )
        }
        let dim_head = c.channels / c.heads;
        let blocks = (0..c.depth)
            .map(|i| {
                BasicTransformerBlock::new(
                    vb.pp("transformer_blocks").pp(i),
                    c.channels,
                    c.heads,
                    dim_head,
                    c.cross_attention_dim,
                    first_cross_attention_index + i,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: GroupNorm::new(vb.pp("norm"), c.norm_num_groups, c.channels, 1e-6)?,
            proj_in: SpatialProjection::new(
                vb.pp("proj_in"),
                c.channels,
                c.channels,
                c.use_linear_projection,
            )?,
            transformer_blocks: blocks,
            proj_out: SpatialProjection::new(
                vb.pp("proj_out"),
                c.channels,
                c.channels,
                c.use_linear_projection,
            )?,
            checkpointing: None,
        })
    }

    pub fn forward(&self, x: &Tensor, cond: TextConditioning) -> Result<Tensor> {
        if let (Some(ckpt), Some(context)) = (&self.checkpointing, self.single_context(cond)?) {
            let mut block = self.clone();
            block.checkpointing = None;
            let f: BlockFn = Arc::new(move |x: &Tensor, c: &Tensor| {
                block.forward(x, TextConditioning::Shared(c))
            });
            return checkpoint(x, context, f, ckpt);
        }
        self.forward_inner(x, cond)
    }

    /// The one text-state tensor all of this model's blocks attend to, if there is one (always
    /// with shared states; with per-layer states when its blocks share a layer's states, as the
    /// one-block transformers of SD 1.x/2.x do): what a recomputed block takes as its context.
    fn single_context<'a>(&self, cond: TextConditioning<'a>) -> Result<Option<&'a Tensor>> {
        let mut found: Option<&'a Tensor> = None;
        for b in &self.transformer_blocks {
            let c = cond.for_layer(b.cross_attention_index)?;
            match found {
                Some(f) if f.id() != c.id() => return Ok(None),
                _ => found = Some(c),
            }
        }
        Ok(found)
    }

    fn forward_inner(&self, x: &Tensor, cond: TextConditioning) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let residual = x;
        let x = self.norm.forward(x)?;
        let to_tokens =
            |t: Tensor| -> Result<Tensor> { t.permute((0, 2, 3, 1))?.reshape((b, h * w, ())) };
        let mut t = match &self.proj_in {
            SpatialProjection::Conv(conv) => to_tokens(conv.forward(&x)?)?,
            SpatialProjection::Linear(lin) => lin.forward(&to_tokens(x)?)?,
        };
        for block in &self.transformer_blocks {
            t = block.forward(&t, cond)?;
        }
        let to_image = |t: Tensor| -> Result<Tensor> {
            t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous()
        };
        let out = match &self.proj_out {
            SpatialProjection::Conv(conv) => conv.forward(&to_image(t)?)?,
            SpatialProjection::Linear(lin) => to_image(lin.forward(&t)?)?,
        };
        out + residual
    }
}

impl VisitProjections for Transformer2DModel {
    fn visit_projections(&mut self, f: &mut dyn FnMut(Projection<'_>)) {
        self.proj_in.visit(f);
        self.transformer_blocks.visit_projections(f);
        self.proj_out.visit(f);
    }
    fn visit_norms(&mut self, f: &mut dyn FnMut(Norm<'_>)) {
        f(Norm::Group(&mut self.norm));
        self.transformer_blocks.visit_norms(f);
    }
}

/// The VAE's single-head spatial self-attention (`Attention` with a group norm and a residual;
/// older checkpoints name its weights `query`/`key`/`value`/`proj_attn`).
#[derive(Clone)]
pub struct SpatialSelfAttention {
    pub group_norm: GroupNorm,
    pub attention: Attention,
}

impl SpatialSelfAttention {
    pub fn new(vb: VarBuilder, channels: usize, groups: usize, eps: f64) -> Result<Self> {
        let group_norm = GroupNorm::new(vb.pp("group_norm"), groups, channels, eps)?;
        let attention = if !vb.contains_tensor("to_q.weight") && vb.contains_tensor("query.weight")
        {
            let lin = |n: &str| Linear::new(vb.pp(n), channels, channels, true);
            Attention {
                to_q: lin("query")?,
                to_k: lin("key")?,
                to_v: lin("value")?,
                to_out: lin("proj_attn")?,
                heads: 1,
                dim_head: channels,
                image_prompt: None,
                regions: vec![],
                unmix: None,
            }
        } else {
            Attention::new(vb, channels, channels, 1, channels, true)?
        };
        Ok(Self {
            group_norm,
            attention,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let t = self
            .group_norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?;
        let o = self.attention.forward(&t, None)?;
        o.transpose(1, 2)?.reshape((b, c, h, w))? + x
    }
}

#[cfg(test)]
mod region_tests {
    use super::*;
    use candle_core::{Device, IndexOp};

    /// The unmix penalty is the mean squared attention probability of the region's tokens at
    /// the queries outside it, computed here by hand; it carries a gradient, and nothing is
    /// observed once the penalties are taken.
    #[test]
    fn unmix_probe_penalizes_a_word_outside_its_region() -> Result<()> {
        let dev = Device::Cpu;
        let (vb, _) = crate::init::random_trainable_var_builder(3, &dev);
        let mut attn = Attention::new(vb, 8, 6, 2, 4, false)?;
        let probe = Arc::new(UnmixProbe::default());
        attn.unmix = Some(probe.clone());
        let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 4, 8), &dev)?)?;
        let ctx = Tensor::randn(0f32, 1.0, (2, 5, 6), &dev)?;
        probe.set_regions(vec![RegionMask {
            tokens: vec![1, 2],
            mask: Tensor::new(&[[1f32, 0.0], [1.0, 0.0]], &dev)?,
            rows: vec![1],
        }]);
        attn.forward(&x, Some(&ctx))?;
        let penalties = probe.take_penalties();
        assert_eq!(penalties.len(), 1);
        let got = penalties[0].to_scalar::<f32>()?;
        // By hand: row 1, both heads, queries 1 and 3 (outside), tokens 1 and 2.
        let q = attn.to_q.forward(&x.as_tensor().i(1)?)?.to_vec2::<f32>()?;
        let k = attn.to_k.forward(&ctx.i(1)?)?.to_vec2::<f32>()?;
        let mut sum = 0f64;
        for h in 0..2 {
            for qi in [1, 3] {
                let logits: Vec<f64> = (0..5)
                    .map(|ki| {
                        (0..4)
                            .map(|d| (q[qi][h * 4 + d] * k[ki][h * 4 + d]) as f64)
                            .sum::<f64>()
                            / 2.0
                    })
                    .collect();
                let z: f64 = logits.iter().map(|l| l.exp()).sum();
                for t in [1, 2] {
                    sum += (logits[t].exp() / z).powi(2);
                }
            }
        }
        let want = sum / 8.0;
        assert!((got as f64 - want).abs() < 1e-6, "{got} vs {want}");
        let grads = penalties[0].backward()?;
        let g = grads
            .get(x.as_tensor())
            .expect("a gradient reaches the input");
        assert!(g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        attn.forward(&x, Some(&ctx))?;
        assert!(probe.take_penalties().is_empty());
        Ok(())
    }

    /// Inside its region a word is attended to as without a region; outside, the softmax runs
    /// as if the word's tokens were not in the context at all. Rows not listed are untouched.
    #[test]
    fn regions_hide_a_word_outside_its_mask_only() -> Result<()> {
        let dev = Device::Cpu;
        let (vb, _) = crate::init::random_trainable_var_builder(7, &dev);
        let mut attn = Attention::new(vb, 8, 6, 2, 4, false)?;
        let x = Tensor::randn(0f32, 1.0, (2, 4, 8), &dev)?; // 2 rows, a 2×2 layer
        let ctx = Tensor::randn(0f32, 1.0, (2, 5, 6), &dev)?;
        let plain = attn.forward(&x, Some(&ctx))?;
        attn.regions = vec![RegionMask {
            tokens: vec![2, 3],
            mask: Tensor::new(&[[1f32, 0.0], [0.0, 0.0]], &dev)?,
            rows: vec![1],
        }];
        let regional = attn.forward(&x, Some(&ctx))?;
        // Row 0 is not masked; position 0 of row 1 is inside the region.
        let diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
            (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
        };
        assert!(diff(&regional.i(0)?, &plain.i(0)?)? < 1e-6);
        assert!(diff(&regional.i((1, 0))?, &plain.i((1, 0))?)? < 1e-6);
        // Outside: the same as attending to the context without tokens 2 and 3.
        let kept = Tensor::cat(&[&ctx.i((1..2, 0..2))?, &ctx.i((1..2, 4..5))?], 1)?;
        attn.regions.clear();
        let without = attn.forward(&x.i(1..2)?, Some(&kept))?;
        assert!(diff(&regional.i((1, 1..4))?, &without.i((0, 1..4))?)? < 1e-5);
        assert!(diff(&regional.i((1, 1..4))?, &plain.i((1, 1..4))?)? > 1e-3);
        Ok(())
    }
}
