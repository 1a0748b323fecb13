"""Measuring a text-to-image model: detectors, metrics and prompt suites."""
