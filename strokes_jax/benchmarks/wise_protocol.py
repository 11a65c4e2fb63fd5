"""The official WISE judging protocols, word for word, and how their replies are read.

Both come from github:PKU-YuanGroup/WISE (commit eb51174), `build_evaluation_messages`:
  legacy    WISE_legacy/gpt_eval.py: the original paper's GPT-4o-2024-05-13 judge, three
            scores on 0..2 (consistency, realism, aesthetic quality); temperature 0,
            max_tokens 2000. BAGEL's fork (ByteDance-Seed/Bagel eval/gen/wise/gpt_eval_mp.py)
            sends the same protocol.
  verified  vllm_eval.py: WISE_Verified's Qwen3.5-35B-A3B judge served by vLLM, one binary
            score; temperature 0, max_tokens 500, thinking off through vLLM's
            chat_template_kwargs.
The texts are kept verbatim (trailing spaces and typos included): a judge's scores are only
comparable under the exact prompt. The reply parsers are the official regular expressions
with their fallbacks (plus the full-width colon that BAGEL's copy accepts); unlike the
official ones they refuse a score outside its scale (the legacy pattern reads any digit), so
such a reply is retried instead of scored.
"""

from __future__ import annotations

import re

PROTOCOLS = ("legacy", "verified")
_PROMPT, _EXPLANATION = "<<PROMPT>>", "<<EXPLANATION>>"

SYSTEM = {
    "legacy": "You are a professional Vincennes image quality audit expert, please evaluate the image quality "
              "strictly according to the protocol.",
    "verified": "You are a professional text-to-image quality auditor. Evaluate the image strictly according to "
                "the protocol.",
}

_LEGACY_USER = "\n".join((
    'Please evaluate strictly and return ONLY the three scores as requested.',
    '',
    '# Text-to-Image Quality Evaluation Protocol',
    '',
    '## System Instruction',
    'You are an AI quality auditor for text-to-image generation. Apply these rules with ABSOLUTE '
    'RUTHLESSNESS. Only images meeting the HIGHEST standards should receive top scores.',
    '',
    '**Input Parameters**  ',
    "- PROMPT: [User's original prompt to]  ",
    '- EXPLANATION: [Further explanation of the original prompt] ',
    '---',
    '',
    '## Scoring Criteria',
    '',
    '**Consistency (0-2):**  How accurately and completely the image reflects the PROMPT.',
    '* **0 (Rejected):**  Fails to capture key elements of the prompt, or contradicts the prompt.',
    '* **1 (Conditional):** Partially captures the prompt. Some elements are present, but not all, or not '
    "accurately.  Noticeable deviations from the prompt's intent.",
    '* **2 (Exemplary):**  Perfectly and completely aligns with the PROMPT.  Every single element and '
    'nuance of the prompt is flawlessly represented in the image. The image is an ideal, unambiguous visual '
    'realization of the given prompt.',
    '',
    '**Realism (0-2):**  How realistically the image is rendered.',
    '* **0 (Rejected):**  Physically implausible and clearly artificial. Breaks fundamental laws of physics '
    'or visual realism.',
    '* **1 (Conditional):** Contains minor inconsistencies or unrealistic elements.  While somewhat '
    'believable, noticeable flaws detract from realism.',
    '* **2 (Exemplary):**  Achieves photorealistic quality, indistinguishable from a real photograph.  '
    'Flawless adherence to physical laws, accurate material representation, and coherent spatial '
    'relationships. No visual cues betraying AI generation.',
    '',
    '**Aesthetic Quality (0-2):**  The overall artistic appeal and visual quality of the image.',
    '* **0 (Rejected):**  Poor aesthetic composition, visually unappealing, and lacks artistic merit.',
    '* **1 (Conditional):**  Demonstrates basic visual appeal, acceptable composition, and color harmony, '
    'but lacks distinction or artistic flair.',
    '* **2 (Exemplary):**  Possesses exceptional aesthetic quality, comparable to a masterpiece.  '
    'Strikingly beautiful, with perfect composition, a harmonious color palette, and a captivating artistic '
    'style. Demonstrates a high degree of artistic vision and execution.',
    '',
    '---',
    '',
    '## Output Format',
    '',
    '**Do not include any other text, explanations, or labels.** You must return only three lines of text, '
    'each containing a metric and the corresponding score, for example:',
    '',
    '**Example Output:**',
    'Consistency: 2',
    'Realism: 1',
    'Aesthetic Quality: 0',
    '',
    '---',
    '',
    '**IMPORTANT Enforcement:**',
    '',
    "Be EXTREMELY strict in your evaluation. A score of '2' should be exceedingly rare and reserved only "
    'for images that truly excel and meet the highest possible standards in each metric. If there is any '
    'doubt, downgrade the score.',
    '',
    "For **Consistency**, a score of '2' requires complete and flawless adherence to every aspect of the "
    'prompt, leaving no room for misinterpretation or omission.',
    '',
    "For **Realism**, a score of '2' means the image is virtually indistinguishable from a real photograph "
    'in terms of detail, lighting, physics, and material properties.',
    '',
    "For **Aesthetic Quality**, a score of '2' demands exceptional artistic merit, not just pleasant visuals.",
    '',
    '--- ',
    'Here are the Prompt and EXPLANATION for this evaluation:',
    'PROMPT: "<<PROMPT>>"',
    'EXPLANATION: "<<EXPLANATION>>"',
    'Please strictly adhere to the scoring criteria and follow the template format when providing your results.',
))

_VERIFIED_USER = "\n".join((
    'Please evaluate this generated image for the WISE benchmark and return ONLY one binary score.',
    '',
    '# WISE Text-to-Image Evaluation Protocol',
    '',
    '## What WISE Is Evaluating',
    'WISE is a knowledge-intensive text-to-image benchmark. Many prompts do not directly state the final '
    'visual answer. Instead, the model must use commonsense, cultural, scientific, spatial, or temporal '
    'knowledge to infer what should appear in the image.',
    '',
    'Your job is not to judge whether the image is beautiful. Your job is to judge whether the generated '
    'image correctly realizes the knowledge-based meaning of the prompt and is visually usable.',
    '',
    '## Input Fields',
    '',
    '**PROMPT**',
    'The original text-to-image prompt given to the image generation model. It may contain an implicit clue '
    'rather than the explicit final answer.',
    '',
    '**EXPLANATION**',
    'The reference interpretation used for judging. It explains the intended answer, the required knowledge '
    'reasoning chain, and the visual evidence that should appear in a correct image. Treat EXPLANATION as '
    'the ground-truth judging guide.',
    '',
    'For example:',
    '- If PROMPT says "the round pastry commonly shared during Mid-Autumn Festival family gatherings", '
    'EXPLANATION may specify mooncakes. A correct image should show mooncakes, not just any festival food.',
    '- If PROMPT says "a plant kept for many days beside a bright one-sided window", EXPLANATION may '
    'specify phototropism. A correct image should show the plant bending toward the light source.',
    '- If PROMPT says "a street in New York when it is midnight in Beijing", EXPLANATION may specify the '
    'corresponding local time and expected lighting/activity. A correct image should reflect that inferred '
    'local time, not simply show Beijing or generic night.',
    '',
    '## How To Judge',
    '',
    'Evaluate the image using these checks:',
    '1. Does the image contain the main objects or scene required by the PROMPT?',
    '2. Does it satisfy the intended knowledge-based answer described in the EXPLANATION?',
    '3. Are important relations correct, such as spatial layout, temporal state, physical effect, '
    'biological behavior, cultural object, or scientific phenomenon?',
    '4. Is the image visually usable for judging, without obvious collapse, severe deformation, unreadable '
    'main objects, or major artifacts?',
    '',
    '## Binary Score',
    '',
    '**Score: 1**',
    'Give 1 only when both conditions are met:',
    '- The image is semantically correct according to both PROMPT and EXPLANATION.',
    '- The image has no obvious generation failure that prevents reliable judging.',
    '',
    'Minor aesthetic weakness, ordinary composition, non-photorealistic style, or lack of artistic beauty '
    'should not by itself cause rejection if the semantic target is correct and the image is clear.',
    '',
    '**Score: 0**',
    'Give 0 if any of the following applies:',
    '- The image misses the intended answer in EXPLANATION.',
    '- The image only follows surface words in PROMPT but fails the required knowledge inference.',
    '- Key objects, attributes, states, behaviors, or relations are missing or wrong.',
    '- The image contradicts the prompt or explanation.',
    '- The main visual evidence is ambiguous enough that a human judge could not confidently verify correctness.',
    '- The image has obvious visual collapse, severe deformation, garbled main objects, impossible '
    'structure, or artifacts that interfere with evaluation.',
    '',
    'If there is serious doubt, return 0.',
    '',
    '## Output Format',
    '',
    'Return exactly one line and nothing else:',
    '',
    'Score: 0',
    '',
    'or',
    '',
    'Score: 1',
    '',
    '---',
    '',
    'PROMPT: "<<PROMPT>>"',
    'EXPLANATION: "<<EXPLANATION>>"',
    '',
    'Return only `Score: 0` or `Score: 1`.',
))

_USER = {"legacy": _LEGACY_USER, "verified": _VERIFIED_USER}
# The request fields each official script sends besides the model and the messages.
REQUEST_OPTIONS = {
    "legacy": {"temperature": 0.0, "max_tokens": 2000},
    "verified": {"temperature": 0.0, "max_tokens": 500, "chat_template_kwargs": {"enable_thinking": False}},
}
SCORE_KEYS = {"legacy": ("consistency", "realism", "aesthetic_quality"), "verified": ("score",)}


def user_text(protocol: str, prompt: str, explanation: str) -> str:
    """The protocol's instruction with the WISE prompt and its explanation filled in."""
    slots = {_PROMPT: prompt, _EXPLANATION: explanation}
    return re.sub("|".join(map(re.escape, slots)), lambda m: slots[m.group(0)], _USER[protocol])


def messages(protocol: str, prompt: str, explanation: str, image_b64: str) -> list[dict]:
    return [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM[protocol]}]},
        {"role": "user", "content": [
            {"type": "text", "text": user_text(protocol, prompt, explanation)},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image_b64}"}}]},
    ]


_LEGACY_RE = re.compile(r"\*{0,2}(Consistency|Realism|Aesthetic Quality)\*{0,2}\s*[:\uff1a]?\s*(\d)", re.I)
_VERIFIED_RE = re.compile(r"\*{0,2}Score\*{0,2}\s*[:\uff1a]?\s*([01])\b", re.I)


def _legacy(text: str) -> dict[str, float]:
    out = {k.lower().replace(" ", "_"): float(v) for k, v in _LEGACY_RE.findall(text)}
    if out:
        return out
    nums = re.findall(r"(?m)^\s*([0-2])\s*$", text)  # a bare three-line reply
    if len(nums) >= 3:
        return dict(zip(SCORE_KEYS["legacy"], map(float, nums[:3])))
    return {}


def _verified(text: str) -> dict[str, float]:
    text = re.sub(r"<think>.*?</think>\s*", "", text, flags=re.S)
    text = re.sub(r"</think>\s*", "", text).strip()
    m = _VERIFIED_RE.search(text)
    if m:
        return {"score": float(m.group(1))}
    nums = re.findall(r"(?m)^\s*([01])\s*$", text)
    return {"score": float(nums[0])} if len(nums) == 1 else {}


def parse_reply(protocol: str, text: str) -> dict[str, float] | None:
    """The scores in a judge's reply, or None when some are missing or off their scale."""
    scores = (_legacy if protocol == "legacy" else _verified)(text)
    top = 2.0 if protocol == "legacy" else 1.0
    if not all(k in scores and 0.0 <= scores[k] <= top for k in SCORE_KEYS[protocol]):
        return None
    return {k: scores[k] for k in SCORE_KEYS[protocol]}
