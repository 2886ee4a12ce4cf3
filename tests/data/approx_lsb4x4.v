// 4x4 unsigned multiplier whose lowest product bit is deliberately wrong:
// p[0] = a[0] | b[0] instead of a[0] & b[0]; bits 7..1 are exact.
module approx_lsb4x4 (
    input  wire [3:0] a,
    input  wire [3:0] b,
    output wire [7:0] p
);
    wire [7:0] exact = a * b;
    assign p = {exact[7:1], a[0] | b[0]};
endmodule
