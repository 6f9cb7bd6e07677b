"""Decoding the uploads a job carries (job format v4) into the model's pixels, on the
worker: the queue moves the photo as sent (some 0.1 MB) instead of s x s x 3 pixels
(1.77 MB at 768 px), and the API only reads headers (docs/scale.md).

The pixels are bit-identical to what the API made before v4: the same function
(`cleandift.images.decode_for_model`) with the same limits. Memory stays bounded: at most
`decode_threads` images are being decoded at once, each within the pixel limit the API
already checked on its header. A bad upload fails its own job (400/413, as the API
answers it), never its batch. Pillow releases the GIL while it decodes, so the threads
overlap with each other and with the forward pass of the batch before.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from cleandift.contract import validate_points
from cleandift.images import ImageError, decode_for_model, pixels_digest
from cleandift.settings import Settings

from ..messages import Job, failure
from .answering import Answer
from .failures import job_failure


class Decoder:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")

    def decode(self, jobs: list[Job]) -> tuple[list[Job], list[Answer]]:
        """(the jobs with their pixels, answers for those whose uploads failed)."""
        work = [(job, i) for job in jobs if job.uploads and not job.images
                for i in range(len(job.uploads))]
        if not work:
            return jobs, []
        done = self._pool.map(lambda item: self._one(*item), work)
        views: dict[str, list] = {}
        for (job, _), view in zip(work, done):
            views.setdefault(job.spec.id, []).append(view)
        ready, answers = [], []
        for job in jobs:
            if job.spec.id not in views:
                ready.append(job)
                continue
            try:
                _take(job, views[job.spec.id], self.settings.max_points)
                ready.append(job)
            except ImageError as exc:
                answers.append((job, failure(job.spec.id, exc.status, str(exc))))
            except Exception as exc:  # noqa: BLE001 - one job's fault is its own answer
                answers.append((job, job_failure(job.spec.id, "decoding", exc)))
        return ready, answers

    def _one(self, job: Job, index: int) -> object:
        """The model's view of one upload and its displayed size, or the error."""
        try:
            return decode_for_model(job.uploads[index], job.spec.input_size,
                                    max_bytes=self.settings.max_body_bytes,
                                    max_pixels=self.settings.max_image_pixels)
        except ImageError as exc:
            exc.args = (f"{upload_name(job, index)}: {exc}",)
            return exc

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _take(job: Job, views: list, max_points: int) -> None:
    """Give the job its pixels; raise the first upload's error. A displayed size that the
    header did not tell (a PNG's EXIF after its pixels) replaces the API's, and the points
    are checked again in that frame."""
    for view in views:
        if isinstance(view, Exception):
            raise view
    sizes = [size for _, size in views]
    if sizes != [tuple(s) for s in job.spec.image_sizes]:
        job.spec.image_sizes = sizes
        if job.spec.points is not None:
            validate_points(job.spec.points, sizes[0], max_points)
    job.images = [pixels for pixels, _ in views]
    job.digests = [pixels_digest(pixels) for pixels in job.images]
    job.uploads = []  # the encoded bytes are not needed any more


def upload_name(job: Job, index: int) -> str:
    """The form field an upload came in, as the API names it in its answers."""
    if job.spec.kind == "features":
        return "image"
    if index == 0:
        return "source"
    return "target" if len(job.uploads) == 2 else f"target {index - 1}"
