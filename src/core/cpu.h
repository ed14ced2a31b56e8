/*
 * CPU features and the kernel level (cpu.c); the public part is in moe.h
 * (moe_cpu_isa, moe_isa_name, moe_cpu_notes, ...).
 */
#ifndef MOE_CPU_H
#define MOE_CPU_H

#include "internal.h"

/* The level (the public moe_cpu_isa() also makes the kernel table). */
moe_isa moe__cpu_level(void);
/* 1 if MOE_MAX_CPU_ISA lowered the level below the CPU's best. */
int moe__cpu_capped(void);
/* Add a line to moe_cpu_notes() unless it is there already (thread-safe). */
void moe__cpu_note(const char *fmt, ...) MOE_PRINTF(1, 2);

#endif
