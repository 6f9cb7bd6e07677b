"""The table from lower-layer errors to HTTP problems: every mapped error answers, a
subclass answers as its closest mapped class, and an unmapped error is refused loudly."""

from __future__ import annotations

import pytest

from cleandift.contract import UnknownLayerError
from cleandift.images import EmptyImageError
from cleandift.service.api.problems import MAPPED, Problem, as_problem
from cleandift.service.queue.errors import NoAnswerByDeadline, QueueFull

EXPECTED = {"RequestError": 422, "ImageError": 400, "QueueFull": 429, "QueueUnavailable": 503,
            "NoLiveWorker": 503, "NoAnswerByDeadline": 504, "ClientGone": 499,
            "BodyTooLarge": 413}


def test_every_mapped_error_answers_its_status():
    statuses = {kind.__name__: as_problem(kind("x")).status for kind in MAPPED
                if kind is not Problem}
    assert statuses == EXPECTED


def test_subclasses_answer_as_their_closest_mapped_class():
    assert as_problem(UnknownLayerError("us99")).status == 422
    assert as_problem(EmptyImageError("empty")).status == 400
    assert as_problem(NoAnswerByDeadline()).kind == "deadline"
    assert "Retry-After" in (as_problem(QueueFull()).headers or {})
    problem = Problem(418, "teapot")
    assert as_problem(problem) is problem


def test_an_unmapped_error_is_refused():
    with pytest.raises(TypeError, match="no problem mapping for KeyError"):
        as_problem(KeyError("x"))
