//! LoRA+ (Hayou, Ghosh and Yu, "LoRA+: Efficient Low Rank Adaptation of Large Models"):
//! B's learning rate is `ratio` times A's. The rule as peft's
//! `create_loraplus_optimizer` applies it, for an optimizer that takes a learning rate
//! per tensor (each parameter is found by its peft name):
//!
//! | parameter | peft name contains | learning rate |
//! |---|---|---|
//! | A | `lora_A` | `lr` |
//! | B | `lora_B` | `lr · ratio` |
//! | DoRA's magnitude (peft: every 1-D parameter) | `lora_magnitude_vector` | `lr · ratio` |
//! | an embedding's adapter | `lora_embedding_A` / `lora_embedding_B` | `embedding_lr` |
//!
//! The authors suggest `ratio` = [`SUGGESTED_RATIO`] (16) and a learning rate somewhat
//! below plain LoRA's; `ratio` = 1 is plain LoRA.

use crate::{Error, Result};

/// The LoRA+ paper's suggested ratio of B's learning rate to A's.
pub const SUGGESTED_RATIO: f32 = 16.0;

/// peft's default learning rate for the adapters of embedding layers under LoRA+.
pub const DEFAULT_EMBEDDING_LR: f32 = 1e-6;

/// What an adapter parameter is, for its learning rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `lora_A`.
    A,
    /// `lora_B`.
    B,
    /// DoRA's `lora_magnitude_vector`.
    Magnitude,
    /// `lora_embedding_A` or `lora_embedding_B`.
    Embedding,
}

impl Role {
    /// The role of a parameter by its peft name (e.g.
    /// `base_model.model.layers.0.self_attn.q_proj.lora_B.default.weight`), or `None` for
    /// a name that is not an adapter parameter.
    pub fn of(name: &str) -> Option<Role> {
        if name.contains("lora_embedding_A") || name.contains("lora_embedding_B") {
            Some(Role::Embedding)
        } else if name.contains("lora_magnitude_vector") {
            Some(Role::Magnitude)
        } else if name.contains("lora_A") {
            Some(Role::A)
        } else if name.contains("lora_B") {
            Some(Role::B)
        } else {
            None
        }
    }
}

/// Learning rates under LoRA+.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraPlus {
    /// A's learning rate.
    pub lr: f32,
    /// B's learning rate over A's.
    pub ratio: f32,
    /// The learning rate of embedding layers' adapters.
    pub embedding_lr: f32,
}

impl LoraPlus {
    /// A's rate `lr`, B's `lr · ratio`, embeddings at [`DEFAULT_EMBEDDING_LR`]. Errors
    /// unless `lr` and `ratio` are finite and > 0.
    pub fn new(lr: f32, ratio: f32) -> Result<Self> {
        let lp = LoraPlus {
            lr,
            ratio,
            embedding_lr: DEFAULT_EMBEDDING_LR,
        };
        lp.validate()?;
        Ok(lp)
    }

    /// Checks that every rate and the ratio are finite and > 0.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("lr", self.lr),
            ("ratio", self.ratio),
            ("embedding_lr", self.embedding_lr),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(Error::Value {
                    name,
                    value: v as f64,
                    reason: "must be finite and > 0",
                });
            }
        }
        Ok(())
    }

    /// The learning rate of a parameter of this role.
    pub fn lr(&self, role: Role) -> f32 {
        match role {
            Role::A => self.lr,
            Role::B | Role::Magnitude => self.lr * self.ratio,
            Role::Embedding => self.embedding_lr,
        }
    }

    /// The learning rate of a parameter by its peft name; `None` if it is not an
    /// adapter parameter.
    pub fn lr_for_name(&self, name: &str) -> Option<f32> {
        Role::of(name).map(|r| self.lr(r))
    }

    /// A parameter's learning rate over A's, for an optimizer that takes A's rate and a
    /// multiplier per tensor ([`crate::adamw::TensorOptions::lr_scale`], with
    /// [`crate::adamw::AdamW::lr`] = `lr`): 1 for A, `ratio` for B and the magnitude,
    /// `embedding_lr / lr` for embeddings (computed in f64).
    pub fn lr_scale(&self, role: Role) -> f64 {
        match role {
            Role::A => 1.0,
            Role::B | Role::Magnitude => self.ratio as f64,
            Role::Embedding => self.embedding_lr as f64 / self.lr as f64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_follow_peft_rule() {
        let lp = LoraPlus::new(2e-4, SUGGESTED_RATIO).unwrap();
        let p = "base_model.model.layers.0.mlp.up_proj";
        assert_eq!(
            lp.lr_for_name(&format!("{p}.lora_A.default.weight")),
            Some(2e-4)
        );
        assert_eq!(
            lp.lr_for_name(&format!("{p}.lora_B.default.weight")),
            Some(2e-4 * 16.0)
        );
        assert_eq!(
            lp.lr_for_name(&format!("{p}.lora_magnitude_vector.default.weight")),
            Some(2e-4 * 16.0)
        );
        assert_eq!(
            lp.lr_for_name("base_model.model.embed_tokens.lora_embedding_B.default"),
            Some(DEFAULT_EMBEDDING_LR)
        );
        assert_eq!(lp.lr_for_name(&format!("{p}.base_layer.weight")), None);
        assert_eq!(LoraPlus::new(1e-3, 1.0).unwrap().lr(Role::B), 1e-3);
    }

    #[test]
    fn lr_scales_give_the_rates() {
        let lp = LoraPlus::new(2e-4, SUGGESTED_RATIO).unwrap();
        for role in [Role::A, Role::B, Role::Magnitude, Role::Embedding] {
            let rate = lp.lr as f64 * lp.lr_scale(role);
            let want = lp.lr(role) as f64;
            assert!(
                (rate - want).abs() <= 1e-7 * want,
                "{role:?}: {rate} vs {want}"
            );
        }
        assert_eq!(lp.lr_scale(Role::A), 1.0);
        assert_eq!(lp.lr_scale(Role::B), 16.0);
    }

    #[test]
    fn bad_rates_are_errors() {
        for (lr, ratio) in [
            (0.0, 1.0),
            (1e-3, -1.0),
            (f32::NAN, 2.0),
            (1e-3, f32::INFINITY),
        ] {
            assert!(matches!(LoraPlus::new(lr, ratio), Err(Error::Value { .. })));
        }
    }
}
