"""ttci/scheduler/web"""
