"""The WKV-7 operator; knows no model."""
