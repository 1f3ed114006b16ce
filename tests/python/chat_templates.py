"""Chat templates as transformers saves and renders them, for the chat-template parity test.

usage: chat_templates.py TOKENIZER_JSON OUT_DIR  ->  one folder per template style under OUT_DIR,
written by `PreTrainedTokenizerFast.save_pretrained` (tokenizer.json, tokenizer_config.json and
chat_template.jinja, or the legacy named list in tokenizer_config.json), and JSON on stdout:
{"transformers": VERSION, "cases": [{"dir", "template_name", "messages", "add_generation_prompt",
"text" (or null), "ids" (or null), "error" (or null)}], "today"} where text is
`apply_chat_template(messages, tokenize=False, ...)` of the tokenizer loaded back from its folder.

With --record (refreshing the fixtures the Rust unit tests read without Python):
`chat_templates.py TOKENIZER_JSON tests/fixtures/chat_templates/saved --record` also deletes the
tokenizer.json files (templates do not need them) and writes the cases, without ids, to
OUT_DIR/../expected.json.
"""
import datetime
import json
import os
import sys

import transformers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

# The templates (tests/fixtures/chat_templates/): smollm.jinja is SmolLM2-Instruct's (ChatML with
# a default system message); llama3.jinja Llama 3.2-Instruct's (bos_token, strftime_now, trim,
# reassigned messages, tool branches with tojson); gemma.jinja Gemma 2's (refuses a system role,
# roles must alternate); tojson.jinja exercises transformers' tojson, Python string methods, loop
# controls, namespace() and special tokens; rag.jinja is a second, named template.
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "chat_templates")


def fixture(name):
    with open(os.path.join(FIXTURES, name + ".jinja"), encoding="utf-8") as f:
        return f.read()


CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "  Be brief.\n"},
        {"role": "user", "content": "Grüße, 世界 <b>&amp;</b>"},
        {"role": "assistant", "content": " Hi there. "},
        {"role": "user", "content": "skip this one? \"quoted\"\ttab"},
    ],
    [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ],
    [{"role": "user", "content": "one"}, {"role": "user", "content": "two"}],
]


def save(tokenizer_json, out, name, template, save_jinja_files=True, **specials):
    tok = PreTrainedTokenizerFast(tokenizer_file=tokenizer_json, **specials)
    tok.chat_template = template
    d = os.path.join(out, name)
    tok.save_pretrained(d, save_jinja_files=save_jinja_files)
    return d


def main():
    tokenizer_json, out = sys.argv[1], sys.argv[2]
    record = "--record" in sys.argv[3:]
    dirs = [
        ("smollm", fixture("smollm"), True, {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}, [None]),
        ("llama3", fixture("llama3"), True, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, [None]),
        ("gemma", fixture("gemma"), True, {"bos_token": "<bos>", "eos_token": "<eos>"}, [None]),
        (
            "tojson",
            fixture("tojson"),
            True,
            {
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "pad_token": "<pad>",
                "extra_special_tokens": {"image_token": "<image>"},
            },
            [None],
        ),
        # Several templates: the new layout (chat_template.jinja + additional_chat_templates/) and
        # the legacy one (a list of {name, template} in tokenizer_config.json).
        ("named", {"default": fixture("smollm"), "rag": fixture("rag")}, True, {"bos_token": "<s>", "eos_token": "</s>"}, [None, "rag"]),
        ("named_legacy", {"default": fixture("smollm"), "rag": fixture("rag")}, False, {"bos_token": "<s>", "eos_token": "</s>"}, [None, "rag"]),
    ]
    cases = []
    for name, template, jinja, specials, names in dirs:
        d = save(tokenizer_json, out, name, template, jinja, **specials)
        tok = AutoTokenizer.from_pretrained(d)
        for template_name in names:
            for messages in CONVERSATIONS:
                for add in (True, False):
                    case = {
                        "dir": name,
                        "template_name": template_name,
                        "messages": messages,
                        "add_generation_prompt": add,
                        "text": None,
                        "ids": None,
                        "error": None,
                    }
                    try:
                        case["text"] = tok.apply_chat_template(
                            messages, chat_template=template_name, tokenize=False, add_generation_prompt=add
                        )
                        case["ids"] = list(
                            tok.apply_chat_template(
                                messages,
                                chat_template=template_name,
                                tokenize=True,
                                return_dict=False,
                                add_generation_prompt=add,
                            )
                        )
                    except Exception as e:  # the template's raise_exception
                        case["error"] = str(e)
                    cases.append(case)
    today = datetime.datetime.now().strftime("%d %b %Y")  # what strftime_now("%d %b %Y") gave
    result = {"transformers": transformers.__version__, "today": today, "cases": cases}
    if record:
        for name, *_ in dirs:
            os.remove(os.path.join(out, name, "tokenizer.json"))
        for case in cases:
            case["ids"] = None
        with open(os.path.join(out, "..", "expected.json"), "w", encoding="utf-8") as f:
            json.dump(result, f, ensure_ascii=False, indent=1)
            f.write("\n")
    print(json.dumps(result, ensure_ascii=False))


if __name__ == "__main__":
    main()
