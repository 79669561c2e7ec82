"""ttci/agent"""
