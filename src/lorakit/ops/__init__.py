"""The math alone: functions of tensors (and of a module's weights), no model surgery, no state."""
