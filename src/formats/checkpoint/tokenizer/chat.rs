//! The llava_v1 conversation (LLaVA `conversation.py` `conv_llava_v1`, SeparatorStyle.TWO with
//! separators " " and "</s>"), which LLaVA-1.5 and LLaVA-MMFuser were trained with:
//!
//! ```text
//! SYSTEM USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:
//! ```
//!
//! The same conversation as a Jinja chat template is written into the LLM GGUF as
//! `tokenizer.chat_template` (converters/chat_templates/llava_v1.jinja) for other runtimes;
//! fixtures/reference/generate.json holds that template rendered by transformers, which the
//! tests compare with [`llava_v1_prompt`].

/// The Jinja template (HF `apply_chat_template` form: `messages`, `bos_token`, `eos_token`,
/// `add_generation_prompt`).
pub const LLAVA_V1_CHAT_TEMPLATE: &str =
    include_str!("../../../../converters/chat_templates/llava_v1.jinja");

/// conv_llava_v1's system message.
pub const LLAVA_V1_SYSTEM: &str = "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the human's questions.";

/// One turn's user text: LLaVA puts the image first in the first turn ("<image>\n" + question).
pub fn first_user_message(question: &str) -> String {
    if question.contains("<image>") {
        question.to_string()
    } else {
        format!("<image>\n{question}")
    }
}

/// The prompt text of a conversation: `turns` are (user message, assistant answer); the last
/// turn's answer is None (the model is to write it).
pub fn llava_v1_prompt(system: &str, turns: &[(&str, Option<&str>)]) -> String {
    let mut s = format!("{system} ");
    for (user, answer) in turns {
        s += &format!("USER: {user} ASSISTANT:");
        if let Some(a) = answer {
            s += &format!(" {a}</s>");
        }
    }
    s
}

/// The text of a further turn, after the previous answer and its "</s>".
pub fn next_turn(question: &str) -> String {
    format!("USER: {question} ASSISTANT:")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_shapes() {
        assert_eq!(
            llava_v1_prompt("S", &[("<image>\nQ", None)]),
            "S USER: <image>\nQ ASSISTANT:"
        );
        assert_eq!(
            llava_v1_prompt("S", &[("<image>\nQ", Some("A")), ("R", None)]),
            format!("S USER: <image>\nQ ASSISTANT: A</s>{}", next_turn("R"))
        );
        assert_eq!(first_user_message("Q"), "<image>\nQ");
        assert_eq!(first_user_message("x <image> y"), "x <image> y");
    }
}
