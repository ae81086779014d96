"""What a request becomes when its engine core died: the rest of it, for another core.

Pure Python. Each unfinished completion is re-sent from its prompt plus the tokens it produced so
far (`output_token_ids`), with the same params: the new core recomputes them as after a preemption
and continues at the same output position, so greedy and seeded sampling go on unchanged and
max_tokens still counts what was produced; a LoRA request keeps its adapter. A completion of an n > 1 request goes alone, under its
`completion_id`, with the params that completion had (`child_params`: n == 1, its own seed).
"""
from __future__ import annotations

from pagedray.cluster.core.messages import CoreRequest, completion_id
from pagedray.cluster.core.validation import child_params
from pagedray.cluster.serving.output_processor import RequestState


def resume_requests(first: CoreRequest, state: RequestState) -> list[CoreRequest]:
    """The CoreRequests that continue `state`'s unfinished completions (`first`: as first sent)."""
    single = len(state.completions) == 1
    requests = []
    for c in state.completions:
        if c.finished:
            continue
        params = first.params.clone() if single else child_params(first.params, c.index)
        params.prompt_logprobs = None    # already delivered with the first output
        rid = first.request_id if single else completion_id(first.request_id, c.index)
        # Same adapter: the new core adds it (if it has not) from the request itself.
        requests.append(CoreRequest(rid, first.prompt_token_ids, params, list(c.token_ids), first.arrival_time,
                                    first.lora_request))
    return requests
