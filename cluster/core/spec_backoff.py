"""Per-request back-off of speculation whose proposals keep failing (dynamic speculation).

A verification step costs more than a plain decode step (k + 1 rows through the target instead of
one), so a request whose proposals are never accepted runs slower than without speculation. After
`backoff_after_failed_steps` verifications in a row that accepted none of its proposals, a request
proposes nothing for a pause of that many steps; then it probes with one verification: if the probe
accepts a proposal the request speculates every step again, else the pause doubles (up to
`backoff_max_steps`). With acceptance 0 over 128 tokens and the defaults (4, 64) about 9 steps verify.

Lossless: the back-off only decides which steps verify. Every step emits the target's own next
token(s) either way (the verification draws each token as the plain sampler does), so outputs,
logprobs and seeded samples are those of the engine without speculation.

Overlapped steps (async scheduling): the driver decides here, when it schedules a step, and the
workers run what it scheduled (no placeholders: no proposals). The outcome of the step in flight is
not known yet, so: a verification that was in flight when a pause began is no probe (it neither
lengthens nor shortens the pause), and a request whose probe is in flight waits for its outcome
instead of verifying again (`wants_proposals`).

Pure Python (no torch); state only for requests whose last verification failed.
"""
from __future__ import annotations


class SpecBackOff:
    """Per request: [failed verifications in a row, the current pause, its steps left]."""

    def __init__(self, after: int, max_steps: int) -> None:
        self.after = after            # 0: never back off
        self.max_steps = max_steps
        # Only requests whose last verification failed; callers test it first (empty: nothing to do).
        self.state: dict[str, list[int]] = {}
        self.num_backed_off_steps = 0   # request-steps run without proposals by a pause (a metric)

    def paused(self, request_id: str) -> bool:
        """Whether the request proposes nothing in its next step."""
        state = self.state.get(request_id)
        return state is not None and state[2] > 0

    def wants_proposals(self, request_id: str, in_flight: int) -> bool:
        """Whether the request's next step may verify proposals; `in_flight`: its proposals in steps
        not read yet (overlapped steps), so a probe in flight is waited for, not repeated."""
        state = self.state.get(request_id)
        if state is None:
            return True
        return state[2] == 0 and not (in_flight and state[0] >= self.after)

    def skips_drafting(self, request_id: str) -> bool:
        """Whether a step scheduled now certainly leaves the request's NEXT step without proposals
        too (its pause has 2+ steps left; overlapped, the step in flight takes off at most one), so
        the workers' proposer need not draft for it in this step."""
        state = self.state.get(request_id)
        return state is not None and state[2] >= 2

    def verified(self, request_id: str, accepted: int) -> None:
        """A verification of the request was read: `accepted` of its proposals were."""
        if accepted or not self.after:
            if self.state:
                self.state.pop(request_id, None)
            return
        state = self.state.get(request_id)
        if state is None:
            state = self.state[request_id] = [0, 0, 0]
        elif state[2]:
            return      # in flight when its pause began: no probe
        state[0] += 1
        if state[0] >= self.after:   # start the pause, or a failed probe doubles it
            state[1] = min(self.max_steps, max(self.after, 2 * state[1]))
            state[2] = state[1]

    def ran_plain(self, request_id: str) -> None:
        """A step of the request without proposals was read."""
        state = self.state.get(request_id)
        if state is not None and state[2]:
            state[2] -= 1
            self.num_backed_off_steps += 1

    def forget(self, request_id: str) -> None:
        self.state.pop(request_id, None)
