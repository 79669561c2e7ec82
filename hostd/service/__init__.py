"""hostd/service"""
