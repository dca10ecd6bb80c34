"""toy/sanity.py: the sanity stream and the tiny base's pretraining data (the toy world's data)."""

import re

import torch

import data
from toy import sanity
from toy.tiny_llava import tiny_tokenizer


def test_sanity_stream_is_deterministic_and_splits_are_disjoint():
    a = sanity.sanity_stream(seed=3, n_train=40, n_test=10)
    sanity._sanity.cache_clear()
    b = sanity.sanity_stream(seed=3, n_train=40, n_test=10)
    assert [t.key for t in a] == data.TASKS
    for ta, tb in zip(a, b):
        assert [(e.problem, e.solution) for e in ta.train] == [(e.problem, e.solution) for e in tb.train]
        for ea, eb in zip(ta.test, tb.test):
            assert ea.solution == eb.solution and (ea.image is None or torch.equal(ea.image, eb.image))
        train = {(e.problem, e.solution, None if e.image is None else e.image.numpy().tobytes()) for e in ta.train}
        test = {(e.problem, e.solution, None if e.image is None else e.image.numpy().tobytes()) for e in ta.test}
        assert not train & test and len(train) == 40 and len(test) == 10
        assert (ta.key in data.TEXT_ONLY) == (ta.train[0].image is None)
    other = sanity.sanity_stream(seed=4, n_train=40, n_test=10)
    assert [e.solution for e in other[0].train] != [e.solution for e in a[0].train]


def test_every_answer_has_the_benchmark_form_and_known_words():
    tok = tiny_tokenizer()
    for task in sanity.sanity_stream(n_train=40, n_test=10):
        for ex in task.train + task.test:
            assert "answer:" in ex.solution
            ids = tok(ex.problem + " " + ex.solution, add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids, ex


def test_pretraining_items_are_not_task_items():
    # planted bug: pretraining drawn with the tasks' seeds or fillers (the base then knows the test items)
    mixture = sanity.pretrain_mixture(0, 600)
    tasks = [e for t in sanity.sanity_stream() for e in t.train + t.test]
    task_images = {e.image.numpy().tobytes() for e in tasks if e.image is not None}
    assert not any(e.image is not None and e.image.numpy().tobytes() in task_images for e in mixture)
    task_texts = {(e.problem, e.solution) for e in tasks if e.image is None}
    assert not {(e.problem, e.solution) for e in mixture} & task_texts
    assert {e.task for e in mixture} >= {f"pretrain-{k}" for k in data.TASKS}  # the tasks' formats are pretrained


def _new_words():
    phrases = [p for _, _, new in sanity.FOMC.values() for p in new]
    return list(sanity.NEW_COLORS) + sanity.NEW_SHAPES + phrases + [" minus "]


def _has_new(ex):  # the solution carries the item's content (science's prompt lists all shapes),
    # except fomc's, which names only the stance: its content is the statement in the prompt
    text = ex.solution + (ex.problem if ex.task in ("fomc", "pretrain-fomc") else "")
    code = ex.solution.split("answer:")[-1].split() if ex.task in ("OCR", "pretrain-OCR") else []
    return any(re.search(rf"\b{w.strip()}s?\b", text) for w in _new_words()) or any(
        c in sanity.NEW_GLYPHS for c in code
    )


def test_new_content_appears_only_in_the_tasks():
    # planted bug: pretraining that also draws NEW_* content (then no task has anything to teach
    # and nothing to forget), or tasks that never draw it
    pretraining = sanity.pretrain_mixture(0, 2000)
    assert not [e for e in pretraining if _has_new(e)]
    # the one exception (see PRETRAIN_KINDS): "read" shows the new glyphs, never in OCR's format
    read = [e.solution.split() for e in pretraining if e.task == "pretrain-read"]  # "the letters B J in red"
    assert any(w in sanity.NEW_GLYPHS for words in read for w in words[2:4])
    for task in sanity.sanity_stream(n_train=80, n_test=10):
        share = sum(map(_has_new, task.train)) / len(task.train)
        assert 0.15 < share < 0.9, (task.key, share)


def test_ocr_codes_survive_answer_normalization():
    # planted bug: an "A" (or "an") glyph, which the VQA normalization drops as an article
    from evaluate import normalize

    for a in sanity.GLYPHS | sanity.NEW_GLYPHS:
        for b in sanity.GLYPHS | sanity.NEW_GLYPHS:
            assert normalize(f"{a} {b}") == f"{a} {b}".lower()


def test_pretraining_mixture_has_known_words_only():
    # planted bug: a word added to a pretraining template but not to vocabulary() (it becomes <unk>)
    tok = tiny_tokenizer()
    for ex in sanity.pretrain_mixture(0, 600):
        assert tok.unk_token_id not in tok(ex.problem + " " + ex.solution, add_special_tokens=False)["input_ids"], ex
