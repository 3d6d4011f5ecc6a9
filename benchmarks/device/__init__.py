"""On-device benchmarks: Android over adb (android_bench.py) and the iOS steps (IOS.md)."""
