// Exact signed 4x3 multiplier (two's complement operands and product).
module signed4x3 (
    input  wire signed [3:0] a,
    input  wire signed [2:0] b,
    output wire signed [6:0] p
);
    assign p = a * b;
endmodule
