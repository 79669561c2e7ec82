"""ttci/scheduler/planning"""
