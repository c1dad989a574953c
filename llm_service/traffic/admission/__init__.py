"""Admission control: whom to admit (policy.py) and the per-slot counts and work it decides on (controller.py)."""

from llm_service.traffic.admission.controller import Admission, AdmissionController, DrainMeter, Reservation
from llm_service.traffic.admission.policy import (
    RETRY_AFTER_SECONDS,
    AdmissionLimits,
    AdmissionPolicy,
    DrainRate,
    Refusal,
    SlotLoad,
    Work,
    queue_seconds,
    requests_at_once,
)

__all__ = [
    "RETRY_AFTER_SECONDS",
    "Admission",
    "AdmissionController",
    "AdmissionLimits",
    "AdmissionPolicy",
    "DrainMeter",
    "DrainRate",
    "Refusal",
    "Reservation",
    "SlotLoad",
    "Work",
    "queue_seconds",
    "requests_at_once",
]
