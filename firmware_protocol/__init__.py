"""firmware_protocol"""
