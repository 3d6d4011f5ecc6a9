"""Test helpers for mobile_app: fakes of the phone APIs and makers of unusual / broken images."""
