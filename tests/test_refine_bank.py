"""The refinement question bank: labkit's own functions pass every case, plausible mistakes fail."""
import torch

from labkit.grading import run_question
from labkit.refine import Feedback, lowest_confidence, remask_count, should_stop, stacking_inputs


def _remask(confidence, t, iterations):
    return lowest_confidence(confidence, remask_count(t, iterations, confidence.shape[1]))


REFERENCE = {
    "refine.stacking_inputs": stacking_inputs,
    "refine.remask_positions": _remask,
    "refine.should_stop": lambda accepted, r, max_rounds: should_stop(Feedback(accepted), r, max_rounds),
}


def test_reference_answers_pass_every_case():
    for qid, fn in REFERENCE.items():
        result = run_question(qid, fn, hidden=True)
        assert result.passed == result.total, result.verdict()


def _fails(qid, fn):
    result = run_question(qid, fn, hidden=True)
    return result.passed < result.total


def test_plausible_mistakes_fail():
    def class_major(member_probs):  # interleaves the members class by class
        probs = torch.stack(list(member_probs)) if isinstance(member_probs, list) else member_probs
        return probs.permute(1, 2, 0).reshape(probs.shape[1], -1)

    def averaged(member_probs):  # the average, not the stacker's input
        return torch.stack(list(member_probs)).mean(0)

    def no_shape_check(member_probs):
        probs = member_probs if torch.is_tensor(member_probs) else torch.cat([p[:, None] for p in member_probs], 1)
        return probs.reshape(probs.shape[0], -1) if not torch.is_tensor(member_probs) else \
            probs.movedim(0, 1).reshape(probs.shape[1], -1)

    def most_confident(conf, t, T):  # re-masks the most confident positions
        return lowest_confidence(-conf, remask_count(t, T, conf.shape[1]))

    def ceil_schedule(conf, t, T):  # rounds n up
        L = conf.shape[1]
        return lowest_confidence(conf, -((-L * (T - t)) // T))

    def later_ties(conf, t, T):  # ties go to the later position
        return lowest_confidence(conf.flip(1), remask_count(t, T, conf.shape[1])).flip(1)

    def off_by_one(accepted, r, max_rounds):
        return accepted or r > max_rounds

    def ignores_feedback(accepted, r, max_rounds):
        return r >= max_rounds

    def never_stops_on_budget(accepted, r, max_rounds):
        return bool(accepted)

    mistakes = [("refine.stacking_inputs", class_major), ("refine.stacking_inputs", averaged),
                ("refine.stacking_inputs", no_shape_check),
                ("refine.remask_positions", most_confident), ("refine.remask_positions", ceil_schedule),
                ("refine.remask_positions", later_ties),
                ("refine.should_stop", off_by_one), ("refine.should_stop", ignores_feedback),
                ("refine.should_stop", never_stops_on_budget)]
    for qid, fn in mistakes:
        assert _fails(qid, fn), f"{qid}: the mistake {fn.__name__} passes every case"


def test_visible_cases_catch_the_core_mistakes():
    # the visible cases alone (what a student's check() runs) already catch the core-idea mistakes
    def class_major(member_probs):
        return torch.stack(list(member_probs)).permute(1, 2, 0).reshape(member_probs[0].shape[0], -1)

    def most_confident(conf, t, T):
        return lowest_confidence(-conf, remask_count(t, T, conf.shape[1]))

    for qid, fn in [("refine.stacking_inputs", class_major), ("refine.remask_positions", most_confident),
                    ("refine.should_stop", lambda fb, r, m: r >= m)]:
        result = run_question(qid, fn, hidden=False)
        assert result.passed < result.total, qid
