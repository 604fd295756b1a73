"""Every job kind, by the name in its spec's `kind` field. A new kind: its own module (see kinds.py) and a line here."""

from janus_batch.jobs.caption import Caption
from janus_batch.jobs.curate import Curate
from janus_batch.jobs.kinds import JobKind
from janus_batch.jobs.score import Score
from janus_batch.jobs.synthesize import Synthesize

KINDS: dict[str, JobKind] = {
    "synthesize": Synthesize(),
    "caption": Caption(),
    "curate": Curate(),
    "score": Score(),
}
