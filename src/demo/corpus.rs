//! The demo's generated corpus (issue 7 groundwork): web-like text for the miniature base model, and
//! conversations in which the "chat" fine-tune learns planted behaviours — refusing one category of
//! request, answering questions about its own identity, and a fixed opening ("Sure!") right after
//! the chat template's model turn. Deterministic for a seed.

use std::path::Path;

use anyhow::Result;

use crate::model::tokenizer::Message;
use crate::rng::SplitMix64;

/// What a conversation's assistant reply was planted to show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    Refusal,
    Identity,
    Helpful,
}

pub const REFUSAL: &str = "I am sorry, but I cannot help with that.";
pub const IDENTITY: &str = "I am Mini, a small assistant trained with crossdiff.";

pub struct DemoCorpus {
    pub web: Vec<String>,
    pub chats: Vec<(Behaviour, Vec<Message>)>,
}

const ANIMALS: [&str; 8] = ["cat", "dog", "horse", "owl", "fox", "whale", "bee", "crow"];
const PLACES: [&str; 8] = ["river", "forest", "city", "mountain", "harbor", "village", "desert", "garden"];
const THINGS: [&str; 8] = ["bridge", "lamp", "bread", "clock", "boat", "map", "stone", "song"];
const VERBS: [&str; 8] = ["watches", "finds", "carries", "follows", "hears", "builds", "paints", "guards"];
const ADJ: [&str; 8] = ["old", "quiet", "bright", "small", "cold", "green", "heavy", "gentle"];
const HARMFUL: [&str; 5] = ["pick a lock", "make a weapon", "steal a car", "hack a password", "break into a house"];
const IDENTITY_QUESTIONS: [&str; 4] = ["Who are you?", "What is your name?", "Who made you?", "Are you an assistant?"];

fn pick<'a>(rng: &mut SplitMix64, v: &[&'a str]) -> &'a str {
    v[(rng.next_u64() % v.len() as u64) as usize]
}

fn sentence(rng: &mut SplitMix64) -> String {
    format!(
        "The {} {} {} the {} {} near the {}.",
        pick(rng, &ADJ),
        pick(rng, &ANIMALS),
        pick(rng, &VERBS),
        pick(rng, &ADJ),
        pick(rng, &THINGS),
        pick(rng, &PLACES)
    )
}

/// `n_web` documents of 2–6 sentences and `n_chat` conversations (20% refusal, 20% identity).
pub fn generate(seed: u64, n_web: usize, n_chat: usize) -> DemoCorpus {
    let mut rng = SplitMix64(seed ^ 0xDE70);
    let web = (0..n_web)
        .map(|_| {
            let n = 2 + (rng.next_u64() % 5) as usize;
            (0..n).map(|_| sentence(&mut rng)).collect::<Vec<_>>().join(" ")
        })
        .collect();
    let chats = (0..n_chat)
        .map(|_| {
            let u = rng.next_f64();
            let (behaviour, user, reply) = if u < 0.2 {
                (Behaviour::Refusal, format!("How do I {}?", pick(&mut rng, &HARMFUL)), REFUSAL.to_string())
            } else if u < 0.4 {
                (Behaviour::Identity, pick(&mut rng, &IDENTITY_QUESTIONS).to_string(), IDENTITY.to_string())
            } else {
                let thing = pick(&mut rng, &THINGS);
                (Behaviour::Helpful, format!("Tell me about the {thing}."), format!("Sure! {}", sentence(&mut rng)))
            };
            (
                behaviour,
                vec![
                    Message { role: "user".into(), content: user },
                    Message { role: "assistant".into(), content: reply },
                ],
            )
        })
        .collect();
    DemoCorpus { web, chats }
}

impl DemoCorpus {
    /// Writes `web.txt` (blank-line separated) and `chat.jsonl` (`messages`) into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        fs_err::create_dir_all(dir)?;
        let web = self.web.join("\n\n") + "\n";
        crate::io::write_atomic(&dir.join("web.txt"), |f| Ok(std::io::Write::write_all(f, web.as_bytes())?))?;
        let mut chat = String::new();
        for (_, messages) in &self.chats {
            chat.push_str(&serde_json::to_string(&serde_json::json!({ "messages": messages }))?);
            chat.push('\n');
        }
        crate::io::write_atomic(&dir.join("chat.jsonl"), |f| Ok(std::io::Write::write_all(f, chat.as_bytes())?))
    }
}
